"""PointNav's reward and metrics, written once for every backend (tensors in, tensors out)."""

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


METRICS = ("success", "spl", "softspl", "distance_to_goal", "collisions", "steps", "path_length",
           "geodesic_distance")
