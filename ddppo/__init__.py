"""ddppo: Decentralized Distributed PPO for embodied PointGoal navigation."""

import os

# torch's OpenMP workers spin for a while after each op; the simulator's numba kernels then fight them for the
# cores (measured: 2x slower stepping on 2 cores). Passive waiting hands the cores over. Only effective when
# ddppo is imported before torch, which is the case for the ddppo command and ddppo/train.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

import gymnasium  # noqa: E402

gymnasium.register(id="ddppo/PointNav-v0", entry_point="ddppo.sim.gym_env:PointNavEnv")
