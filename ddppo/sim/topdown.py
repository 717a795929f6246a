"""Top-down map of a scene with the goal, the agent and the path it walked (for videos and debugging)."""

from __future__ import annotations

import math

import numpy as np

from ddppo.sim.scene import FREE, OBJECT, Scene

FLOOR, WALL_C, OBJECT_C, NAV_EDGE = (235, 235, 235), (60, 60, 70), (150, 110, 80), (200, 200, 205)
PATH, GOAL, AGENT = (40, 110, 230), (220, 40, 40), (30, 170, 60)


def top_down_map(scene: Scene, navigable: np.ndarray | None = None, path=(), goal=None, agent=None,
                 agent_heading: float | None = None, max_size: int = 512) -> np.ndarray:
    """RGB uint8 image, x to the right and z downwards. Positions are world (x, z) pairs."""
    img = np.empty((*scene.shape, 3), np.uint8)
    img[:] = WALL_C
    img[scene.occupancy == FREE] = NAV_EDGE
    if navigable is not None:
        img[navigable] = FLOOR
    img[scene.occupancy == OBJECT] = OBJECT_C
    scale = max(1, int(math.ceil(max(scene.shape) / max_size)))
    img = img[::scale, ::scale].copy()
    px_per_m = 1.0 / (scene.cell_size * scale)

    def to_px(x, z):
        return (z - scene.origin[1]) * px_per_m, (x - scene.origin[0]) * px_per_m

    def disc(x, z, radius_m, color):
        r, c = to_px(x, z)
        rad = max(1.5, radius_m * px_per_m)
        rr, cc = np.ogrid[: img.shape[0], : img.shape[1]]
        img[(rr - r) ** 2 + (cc - c) ** 2 <= rad * rad] = color

    pts = [(float(p[0]), float(p[-1])) for p in path]
    for (x0, z0), (x1, z1) in zip(pts, pts[1:]):
        steps = max(2, int(math.hypot(x1 - x0, z1 - z0) * px_per_m * 2))
        for t in np.linspace(0, 1, steps):
            disc(x0 + t * (x1 - x0), z0 + t * (z1 - z0), 0.03, PATH)
    if goal is not None:
        disc(float(goal[0]), float(goal[-1]), 0.2, GOAL)
    if agent is not None:
        ax, az = float(agent[0]), float(agent[-1])
        disc(ax, az, 0.15, AGENT)
        if agent_heading is not None:
            for t in np.linspace(0, 0.4, 12):
                disc(ax - math.sin(agent_heading) * t, az - math.cos(agent_heading) * t, 0.04, AGENT)
    return img
