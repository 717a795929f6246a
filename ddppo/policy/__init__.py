"""Actor-critic policy and visual encoders for DD-PPO PointGoal navigation."""

from ddppo.policy.encoders import ENCODERS, make_encoder
from ddppo.policy.policy import GOAL_SENSOR, Policy, VisualInput, goal_features
from ddppo.policy.running_norm import RunningMeanAndVar

__all__ = [
    "ENCODERS",
    "GOAL_SENSOR",
    "Policy",
    "RunningMeanAndVar",
    "VisualInput",
    "goal_features",
    "make_encoder",
]
