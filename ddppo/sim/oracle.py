"""Shortest-path follower: greedy descent of the goal's geodesic field, usable as an agent.

It is the independent check that geometry, geodesics and metrics agree: if it fails to reach goals or walks
long paths, one of them is wrong.
"""

from __future__ import annotations

import math

import torch

from ddppo.sim.geometry import MOVE_FORWARD, STOP, TURN_LEFT, TURN_RIGHT, wrap_angle
from ddppo.sim.kernels.torch_kernels import navigable


class ShortestPathFollower:
    """Stops inside ``stop_distance``; otherwise turns toward the heading (of 36) whose next-step position is
    geodesically closest to the goal, and moves forward once facing it."""

    def __init__(self, env, stop_distance: float | None = None, lookahead: float = 0.25, headings: int = 36):
        self.env = env
        self.stop_distance = stop_distance if stop_distance is not None else 0.75 * env.task.success_distance
        self.lookahead = lookahead
        self.headings = headings

    def act(self) -> torch.Tensor:
        sim = self.env.sim
        n = sim.num_envs
        dev = sim.device
        dist = sim.geodesic()
        angles = torch.arange(self.headings, device=dev) * (2 * math.pi / self.headings)
        cand_x = (sim.x[:, None] - torch.sin(angles)[None] * self.lookahead).reshape(-1)
        cand_z = (sim.z[:, None] - torch.cos(angles)[None] * self.lookahead).reshape(-1)
        rows = torch.arange(n, device=dev).repeat_interleave(self.headings)
        scene_of = sim.scene_of[rows]
        geo = sim.kernels.geodesic(sim.fields, rows, sim.atlas, scene_of, cand_x, cand_z, sim.goal_x[rows],
                                  sim.goal_z[rows]).to(dev)
        nav = navigable(sim.atlas, scene_of, cand_x, cand_z)
        geo = torch.where(nav, geo, math.inf).view(n, self.headings)
        best = angles[geo.argmin(dim=1)]
        err = wrap_angle(best - sim.theta)
        half_turn = 0.5 * sim.turn + 1e-4
        action = torch.where(err > half_turn, TURN_LEFT, torch.where(err < -half_turn, TURN_RIGHT, MOVE_FORWARD))
        return torch.where(dist < self.stop_distance, STOP, action)

