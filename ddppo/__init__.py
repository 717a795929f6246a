"""ddppo: Decentralized Distributed PPO for embodied PointGoal navigation."""

# OpenMP's wait policy is left to the runtime (libgomp: spin briefly after each parallel region, then sleep). Forcing
# OMP_WAIT_POLICY=PASSIVE, as ddppo did before 2026-11-28, cost ~6-10% of training throughput on 2 cores
# (bench/RESULTS.md, "Training throughput"; the runs in bench/LOG.md, "OpenMP wait policy"); ACTIVE gains a few % more
# but keeps idle threads spinning for good, stealing cores from child processes (torchrun workers, SLURM tasks) and
# from anything else on the machine.

__version__ = "0.1.0"

import gymnasium

gymnasium.register(id="ddppo/PointNav-v0", entry_point="ddppo.sim.gym_env:PointNavEnv")
