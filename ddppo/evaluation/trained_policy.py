"""A trained policy and its config from a checkpoint file, ddppo's or habitat-baselines', for evaluation, transfer
and representation analysis."""

from __future__ import annotations

from pathlib import Path

import torch

from ddppo.config import ConfigError, TrainConfig, load_config
from ddppo.io import checkpoint
from ddppo.policy import Policy
from ddppo.policy.habitat_baselines_weights import (
    ddppo_state_dict,
    is_habitat_baselines_checkpoint,
    policy_overrides,
)


def policy_spaces(cfg: TrainConfig) -> dict:
    """The observation spaces a policy for ``cfg`` sees (the simulator's, without building one)."""
    r = cfg.sim.resolution
    spaces = {"pointgoal_with_gps_compass": ((2,), torch.float32)}
    if "rgb" in cfg.sim.sensors:
        spaces["rgb"] = ((r, r, 3), torch.uint8)
    if "depth" in cfg.sim.sensors:
        spaces["depth"] = ((r, r, 1), torch.float32)
    return spaces


def policy_from_checkpoint(path: str | Path, overrides=()):
    """(policy, config) of a training checkpoint, ddppo's or habitat-baselines'; a file that is not one, or that
    does not fit the configured architecture, is a one-line ValueError naming it."""
    ckpt = checkpoint.load(path)
    if is_habitat_baselines_checkpoint(ckpt):
        return _habitat_baselines_policy(ckpt, path, overrides)
    if "policy" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint {path}: missing field 'policy' or 'config' (not a ddppo checkpoint)")
    if not isinstance(ckpt["config"], dict):
        raise ValueError(f"checkpoint {path}: field 'config' is a {type(ckpt['config']).__name__}, not a mapping")
    try:
        cfg = load_config(None, list(overrides), saved=ckpt["config"])
    except ConfigError as e:  # a foreign or edited checkpoint: say which file the bad config came from
        raise ValueError(f"checkpoint {path}: config: {e}") from None
    policy = Policy(policy_spaces(cfg), cfg.policy)
    if not isinstance(ckpt["policy"], dict):
        raise ValueError(f"checkpoint {path}: field 'policy' is a {type(ckpt['policy']).__name__}, not weights")
    try:
        policy.load_state_dict(ckpt["policy"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0])
        raise ValueError(f"checkpoint {path}: weights do not fit the configured policy ({detail[:200]})") from None
    return policy.eval(), cfg


def _habitat_baselines_policy(ckpt: dict, path, overrides):
    """A habitat-baselines PointNavResNetPolicy checkpoint: ddppo's defaults, the policy its weights imply
    (ddppo/policy/habitat_baselines_weights.py), then ``overrides`` (the backend and dataset to evaluate on)."""
    source = f"checkpoint {path}"
    try:
        cfg = load_config(None, [*policy_overrides(ckpt, source), *overrides])
    except ConfigError as e:
        raise ValueError(f"{source}: {e}") from None
    policy = Policy(policy_spaces(cfg), cfg.policy)
    policy.load_state_dict(ddppo_state_dict(ckpt, policy, source))
    return policy.eval(), cfg
