"""ddppo: Decentralized Distributed PPO for embodied PointGoal navigation."""

# OpenMP's wait policy is left to the runtime (libgomp: spin briefly after each parallel region, then sleep): PASSIVE
# costs training throughput, and ACTIVE keeps idle threads spinning for good, stealing cores from child processes
# (torchrun workers, SLURM tasks) and from anything else on the machine (bench/RESULTS.md, "Training throughput").

__version__ = "0.1.0"

import gymnasium

gymnasium.register(id="ddppo/PointNav-v0", entry_point="ddppo.sim.gym_env:PointNavEnv")
