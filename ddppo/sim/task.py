"""PointNav's reward and metrics, written once for every backend (tensors in, tensors out). The embedded
simulator's CPU path runs a compiled twin of the per-step bookkeeping (ddppo.sim.kernels)."""

from __future__ import annotations

import torch


def pointnav_reward(prev_distance: torch.Tensor, distance: torch.Tensor, success: torch.Tensor,
                    slack: float = -0.01, success_reward: float = 2.5) -> torch.Tensor:
    """Habitat's reward: slack + decrease of geodesic distance to the goal + a bonus on success."""
    progress = torch.nan_to_num(prev_distance - distance, nan=0.0, posinf=0.0, neginf=0.0)
    return slack + progress + success.to(progress.dtype) * success_reward


def spl(success: torch.Tensor, start_distance: torch.Tensor, path_length: torch.Tensor) -> torch.Tensor:
    """Success weighted by (normalised inverse) path length: S * l / max(p, l)."""
    return success.to(path_length.dtype) * start_distance / torch.maximum(path_length, start_distance)


def soft_spl(distance: torch.Tensor, start_distance: torch.Tensor, path_length: torch.Tensor) -> torch.Tensor:
    """SPL with success replaced by the progress made: max(0, 1 - d_T / l) * l / max(p, l)."""
    progress = (1.0 - distance / start_distance).clamp(min=0.0)
    return progress * start_distance / torch.maximum(path_length, start_distance)


def pointnav_step(task, stop: torch.Tensor, was_active: torch.Tensor, prev_distance: torch.Tensor,
                  distance: torch.Tensor, start_distance: torch.Tensor, path_length: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PointNav's rule for one step of every env, whatever simulator measured ``distance`` (geodesic, after the
    step): success is STOP within ``task.success_distance``; returns the reward (zero for inactive envs) and the
    metrics of the episode as it stands. ``stop`` is the STOP action of the active envs."""
    success = stop & (distance < task.success_distance)
    reward = pointnav_reward(prev_distance, distance, success, task.slack_reward, task.success_reward) * was_active
    return reward, {
        "success": success.float(),
        "spl": spl(success, start_distance, path_length),
        "softspl": soft_spl(distance, start_distance, path_length),
        "distance_to_goal": distance.clone(),
    }


def episode_ends(task, stop: torch.Tensor, was_active: torch.Tensor, steps: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(terminated, truncated): STOP ends an episode; otherwise ``task.max_episode_steps`` truncates it."""
    return stop.clone(), was_active & ~stop & (steps >= task.max_episode_steps)


METRICS = ("success", "spl", "softspl", "distance_to_goal", "collisions", "steps", "path_length",
           "geodesic_distance")
