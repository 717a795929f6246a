"""PointNav's reward and metrics, written once for every backend (tensors in, tensors out), and compiled twins of
the per-step bookkeeping for the embedded simulator's CPU path (one pass instead of ~30 small tensor operations,
each of which costs several microseconds on 32 envs). tests/test_vector_env.py checks the twins agree."""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ddppo.rows import as_numpy
from ddppo.sim.geometry import STOP


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


def tally_torch(task, actions, was_active, collided, moved, steps, path_length, collisions
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count the step taken into the episode's steps, path length and collisions (in place; ``collided`` only
    where active); returns (stop, terminated, truncated). ``actions`` are STOP for inactive envs."""
    collided &= was_active
    steps += was_active.long()
    path_length += moved
    collisions += collided.long()
    stop = (actions == STOP) & was_active
    return (stop, *episode_ends(task, stop, was_active, steps))


@numba.njit(cache=True, error_model="numpy")
def _tally_numba(actions, was_active, collided, moved, steps, path_length, collisions, max_steps, stop, truncated):
    for n in range(actions.shape[0]):
        collided[n] &= was_active[n]
        steps[n] += was_active[n]
        path_length[n] += moved[n]
        collisions[n] += collided[n]
        stop[n] = actions[n] == STOP and was_active[n]
        truncated[n] = was_active[n] and not stop[n] and steps[n] >= max_steps


def tally_numba(task, actions, was_active, collided, moved, steps, path_length, collisions):
    """The twin of ``tally_torch`` on CPU tensors (or their numpy views)."""
    stop, truncated = np.empty(actions.shape[0], np.bool_), np.empty(actions.shape[0], np.bool_)
    _tally_numba(*map(as_numpy, (actions, was_active, collided, moved, steps, path_length, collisions)),
                 task.max_episode_steps, stop, truncated)
    stop = torch.from_numpy(stop)
    return stop, stop.clone(), torch.from_numpy(truncated)


# error_model="numpy": a degenerate episode (its start on the goal) divides by zero into inf/NaN, as the torch twin
# does, instead of raising ZeroDivisionError
@numba.njit(cache=True, error_model="numpy")
def _pointnav_step_numba(stop, was_active, prev_distance, distance, start_distance, path_length, success_distance,
                         slack, success_reward, reward, success, spl, softspl):
    for n in range(stop.shape[0]):
        won = stop[n] and distance[n] < success_distance
        progress = prev_distance[n] - distance[n]
        if not math.isfinite(progress):
            progress = 0.0
        reward[n] = (slack + progress + (success_reward if won else 0.0)) if was_active[n] else 0.0
        success[n] = 1.0 if won else 0.0
        longest = max(path_length[n], start_distance[n])
        spl[n] = (1.0 if won else 0.0) * start_distance[n] / longest
        made = 1.0 - distance[n] / start_distance[n]
        softspl[n] = (0.0 if made < 0.0 else made) * start_distance[n] / longest


def pointnav_step_numba(task, stop, was_active, prev_distance, distance, start_distance, path_length):
    """The twin of ``pointnav_step`` on CPU tensors (or their numpy views; ``distance`` a tensor)."""
    reward, success, spl_, softspl = (np.empty(stop.shape[0], np.float32) for _ in range(4))
    _pointnav_step_numba(*map(as_numpy, (stop, was_active, prev_distance, distance, start_distance, path_length)),
                         task.success_distance, task.slack_reward, task.success_reward, reward, success, spl_, softspl)
    t = torch.from_numpy
    return t(reward), {"success": t(success), "spl": t(spl_), "softspl": t(softspl),
                       "distance_to_goal": distance.clone()}


TALLY = {"numba": tally_numba, "torch": tally_torch}
POINTNAV_STEP = {"numba": pointnav_step_numba, "torch": pointnav_step}

METRICS = ("success", "spl", "softspl", "distance_to_goal", "collisions", "steps", "path_length",
           "geodesic_distance")
