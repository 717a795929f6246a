"""Shortest-path follower: greedy descent of the goal's geodesic field through the simulator's own step, usable as
an agent.

It is the independent check that geometry, geodesics and metrics agree: if it fails to reach goals or walks long
paths, one of them is wrong. Like habitat-sim's GreedyGeodesicFollower it plans through the step filter and avoids
collisions: every heading the agent can reach by turning is tried with a forward step as the simulator would take it
(sliding included), and a step that collides counts a full step longer. Unlike habitat's follower, which searches
sequences of actions along the navmesh's shortest path, it looks one step ahead in the geodesic field
(docs/scene_export.md, "Collisions on both backends", compares the two).
"""

from __future__ import annotations

import math

import torch

from ddppo.sim.geometry import MOVE_FORWARD, STOP, TURN_LEFT, TURN_RIGHT


class ShortestPathFollower:
    """Stops inside ``stop_distance``; otherwise turns toward the reachable heading (the current one plus a whole
    number of turns) whose forward step ends geodesically closest to the goal, and moves forward once facing it."""

    def __init__(self, env, stop_distance: float | None = None):
        self.env = env
        self.stop_distance = stop_distance if stop_distance is not None else 0.75 * env.task.success_distance

    def act(self) -> torch.Tensor:
        sim = self.env.sim
        n, dev = sim.num_envs, sim.device
        turns = round(2 * math.pi / sim.turn)
        k = torch.arange(-(turns // 2), turns - turns // 2, device=dev)  # turns to each heading; + is left
        rows = torch.arange(n, device=dev).repeat_interleave(len(k))
        x, z = sim.x[rows].clone(), sim.z[rows].clone()
        theta = sim.theta[rows] + (k * sim.turn).repeat(n)
        scene_of = sim.scene_of[rows]
        forward = torch.full_like(rows, MOVE_FORWARD)
        collided, _ = sim.kernels.step(sim.atlas, scene_of, x, z, theta, forward, 0.0, sim.forward_step,
                                       sim.substeps)
        geo = sim.kernels.geodesic(sim.fields, rows, sim.atlas, scene_of, x, z, sim.goal_x[rows],
                                   sim.goal_z[rows]).to(dev)
        cost = (geo + collided.to(dev).float() * sim.forward_step).view(n, len(k))
        # the fewest turns among equal costs: candidates ordered by |turns|, and argmin keeps the first
        order = torch.argsort(k.abs(), stable=True)
        best_turns = k[order][cost[:, order].argmin(dim=1)]
        action = torch.where(best_turns > 0, TURN_LEFT, torch.where(best_turns < 0, TURN_RIGHT, MOVE_FORWARD))
        return torch.where(sim.geodesic() < self.stop_distance, STOP, action)
