"""The tasks, one registry (:data:`TASKS`, ``task.type`` -> batched environment class): PointNav
(ddppo.sim.vector_env) and the downstream tasks of the transfer experiments (DD-PPO §6; Wijmans, Morcos et al. 2020),
Flee and Exploration, written here.

Both run on PointNav episodes (their start poses; the episode's goal plays no part) and keep PointNav's
observation keys and shapes, so a PointNav policy or encoder loads unchanged. Choices, where the papers leave
room:

- The goal sensor ``pointgoal_with_gps_compass`` reads zeros: these tasks have no goal, and a reading that points
  to the PointNav goal would hint at a direction to walk (goals lie 1-30 m away from the start) that is not part
  of the task. The key stays so the policy's goal pathway keeps its shape; it sees a constant.
- STOP ends the episode (as in PointNav), with no bonus: an agent that stops gives up the reward it could
  still collect, so learning not to stop early is part of the task. Otherwise episodes end after
  ``task.max_episode_steps``.
- No slack penalty: it would make stopping early attractive when the agent cannot find more reward.

**Flee**: reward = increase, this step, of the geodesic distance from the episode's start; the episode metric
``distance_from_start`` is that distance when the episode ends (so the return of an episode equals it). The
distance comes from a fast-marching field computed from the start (NavGrid.geodesic_field, cached by
GeodesicCache beside the goal fields) and looked up by the simulator's own geodesic kernel.

**Exploration**: the scene is cut into square coverage cells of COVERAGE_CELL (0.5 m) aligned with the scene's
origin; a cell is covered once the agent's centre has been inside it, and it is worth its navigable area (the
navigable scene cells whose centres it contains). Reward = navigable area (m²) of the cells covered for the
first time this step; the metric ``area_covered`` is the navigable area of all covered cells, the start's cell
included (which earns no reward). Visited-cell coverage, rather than what the camera saw, keeps the reward
independent of the sensors, cheap (one gather per env per step, in torch) and checkable by hand.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddppo.config import TaskType
from ddppo.sim.dataset import scene_name
from ddppo.sim.vector_env import PointNavVectorEnv

COVERAGE_CELL = 0.5
"""Metres: side of the square cells whose coverage the Exploration reward counts."""


def _zero_goal(obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    obs["pointgoal_with_gps_compass"] = torch.zeros_like(obs["pointgoal_with_gps_compass"])
    return obs


class FleeVectorEnv(PointNavVectorEnv):
    """Flee: get as far (geodesically) from the episode's start as possible. See the module docstring."""

    episode_metrics = ("distance_from_start", "collisions")
    has_goal = False
    record_metrics = ("distance_from_start", "collisions", "steps", "path_length")
    _STATE = PointNavVectorEnv._STATE + ("prev_from_start",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prev_from_start = torch.zeros(self.num_envs, device=self.device)
        # one start field per env, laid out like the simulator's goal fields so its geodesic kernel reads them
        self.start_fields = torch.full_like(self.sim.fields, math.inf)

    def _start_fields_of(self, env_ids: list[int]) -> list[np.ndarray]:
        fields = []
        for e in env_ids:
            ep = self.episodes[int(self.episode_index[e])]
            nav = self.navs[self.atlas.index[scene_name(ep.scene_id)]]
            fields.append(self.cache.get(nav, ep.start_position[0], ep.start_position[2]))
        return fields

    def _put_start_fields(self, env_ids: list[int]) -> None:
        # through numpy on CPU, as BatchSimulator.place does: torch would hand these copies to its thread pool
        target = self.start_fields.numpy() if self.device.type == "cpu" else self.start_fields
        for e, f in zip(env_ids, self._start_fields_of(env_ids)):
            target[e] = math.inf
            target[e, : f.shape[0], : f.shape[1]] = f if self.device.type == "cpu" else torch.from_numpy(f).to(
                self.device)

    def distance_from_start(self, env_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Geodesic distance from each agent's episode start to where it is now (metres)."""
        idx = self.sim.all_envs if env_ids is None else env_ids
        sim = self.sim
        d = sim.kernels.geodesic(self.start_fields, idx, self.atlas, sim.scene_of[idx], sim.x[idx], sim.z[idx],
                                self.start_x[idx], self.start_z[idx]).to(self.device)
        return torch.nan_to_num(d, nan=0.0, posinf=0.0)  # an agent always stays on its start's island

    def _start_episodes_untimed(self, env_ids: list[int]) -> list[int]:
        started = super()._start_episodes_untimed(env_ids)
        if started:
            self._put_start_fields(started)
            ids = torch.tensor(started, device=self.device)
            self.prev_from_start[ids] = self.distance_from_start(ids)
        return started

    def _reward_and_metrics(self, stop, was_active):
        d = self.distance_from_start()
        reward = (d - self.prev_from_start) * was_active
        self.prev_from_start = d
        return reward, {"distance_from_start": d.clone()}

    def _observe(self, env_ids=None):
        return _zero_goal(super()._observe(env_ids))

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._put_start_fields(list(range(self.num_envs)))


def coverage_cell_areas(navs, cell: float = COVERAGE_CELL) -> np.ndarray:
    """[scenes, rows, cols] navigable area (m²) of every coverage cell, padded with zeros to a common shape."""
    shapes, areas = [], []
    for nav in navs:
        c = nav.scene.cell_size
        h, w = nav.navigable.shape
        rows, cols = math.ceil(h * c / cell), math.ceil(w * c / cell)
        # the coverage cell holding each scene cell's centre
        jc = np.minimum(((np.arange(h) + 0.5) * c / cell).astype(np.int64), rows - 1)
        ic = np.minimum(((np.arange(w) + 0.5) * c / cell).astype(np.int64), cols - 1)
        flat = (jc[:, None] * cols + ic[None, :])[nav.navigable]
        areas.append(np.bincount(flat, minlength=rows * cols).reshape(rows, cols) * c * c)
        shapes.append((rows, cols))
    out = np.zeros((len(navs), max(s[0] for s in shapes), max(s[1] for s in shapes)), np.float32)
    for k, a in enumerate(areas):
        out[k, : a.shape[0], : a.shape[1]] = a
    return out


class ExplorationVectorEnv(PointNavVectorEnv):
    """Exploration: cover as much navigable area as possible. See the module docstring."""

    episode_metrics = ("area_covered", "collisions")
    has_goal = False
    record_metrics = ("area_covered", "collisions", "steps", "path_length")
    _STATE = PointNavVectorEnv._STATE + ("visited", "area_covered")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cell_area = torch.as_tensor(coverage_cell_areas(self.navs), device=self.device)
        rows, cols = self.cell_area.shape[1:]
        self.visited = torch.zeros(self.num_envs, rows, cols, dtype=torch.bool, device=self.device)
        self.area_covered = torch.zeros(self.num_envs, device=self.device)

    def _cover(self, ids: torch.Tensor) -> torch.Tensor:
        """Mark the cells the agents ``ids`` stand in as covered; returns the area each newly covered."""
        sim = self.sim
        s = sim.scene_of[ids]
        rows, cols = self.cell_area.shape[1:]
        i = torch.floor((sim.x[ids] - self.atlas.origin[s, 0]) / COVERAGE_CELL).long().clamp(0, cols - 1)
        j = torch.floor((sim.z[ids] - self.atlas.origin[s, 1]) / COVERAGE_CELL).long().clamp(0, rows - 1)
        flat = j * cols + i
        visited = self.visited.view(self.num_envs, -1)
        new = ~visited[ids, flat]
        area = self.cell_area.view(self.cell_area.shape[0], -1)[s, flat] * new
        visited[ids, flat] = True
        self.area_covered[ids] += area
        return area

    def _start_episodes_untimed(self, env_ids: list[int]) -> list[int]:
        started = super()._start_episodes_untimed(env_ids)
        if started:
            ids = torch.tensor(started, device=self.device)
            self.visited[ids] = False
            self.area_covered[ids] = 0.0
            self._cover(ids)
        return started

    def _reward_and_metrics(self, stop, was_active):
        # an inactive env is not moved (its action is STOP), so it stays in a covered cell and earns nothing
        reward = self._cover(self.sim.all_envs) * was_active
        return reward, {"area_covered": self.area_covered.clone()}

    def _observe(self, env_ids=None):
        return _zero_goal(super()._observe(env_ids))


TASKS = {TaskType.pointnav: PointNavVectorEnv, TaskType.flee: FleeVectorEnv, TaskType.exploration: ExplorationVectorEnv}
"""``task.type`` -> batched environment class (same constructor, observations and API)."""
