"""Top-down map of a scene with the goal, the agent and the path it walked (for videos and debugging)."""

from __future__ import annotations

import math

import numpy as np

from ddppo.sim.scene import FREE, OBJECT, Scene

FLOOR, WALL_C, OBJECT_C, NAV_EDGE = (235, 235, 235), (60, 60, 70), (150, 110, 80), (200, 200, 205)
PATH, GOAL, AGENT = (40, 110, 230), (220, 40, 40), (30, 170, 60)


class TopDownMap:
    """x to the right, z downwards. The path is drawn incrementally, so a video costs one segment per frame."""

    def __init__(self, scene: Scene, navigable: np.ndarray | None = None, max_size: int = 512):
        img = np.empty((*scene.shape, 3), np.uint8)
        img[:] = WALL_C
        img[scene.occupancy == FREE] = NAV_EDGE
        if navigable is not None:
            img[navigable] = FLOOR
        img[scene.occupancy == OBJECT] = OBJECT_C
        scale = max(1, int(math.ceil(max(scene.shape) / max_size)))
        self.canvas = img[::scale, ::scale].copy()
        self.px_per_m = 1.0 / (scene.cell_size * scale)
        self.origin = scene.origin

    def _disc(self, img, x: float, z: float, radius_m: float, color) -> None:
        r = (z - self.origin[1]) * self.px_per_m
        c = (x - self.origin[0]) * self.px_per_m
        rad = max(1.5, radius_m * self.px_per_m)
        r0, r1 = max(0, int(r - rad)), min(img.shape[0], int(r + rad) + 2)
        c0, c1 = max(0, int(c - rad)), min(img.shape[1], int(c + rad) + 2)
        if r0 >= r1 or c0 >= c1:
            return
        rr, cc = np.ogrid[r0:r1, c0:c1]
        img[r0:r1, c0:c1][(rr - r) ** 2 + (cc - c) ** 2 <= rad * rad] = color

    def add_segment(self, a, b) -> None:
        (x0, z0), (x1, z1) = (float(a[0]), float(a[-1])), (float(b[0]), float(b[-1]))
        steps = max(2, int(math.hypot(x1 - x0, z1 - z0) * self.px_per_m * 2))
        for t in np.linspace(0, 1, steps):
            self._disc(self.canvas, x0 + t * (x1 - x0), z0 + t * (z1 - z0), 0.03, PATH)

    def render(self, goal=None, agent=None, agent_heading: float | None = None) -> np.ndarray:
        img = self.canvas.copy()
        if goal is not None:
            self._disc(img, float(goal[0]), float(goal[-1]), 0.2, GOAL)
        if agent is not None:
            ax, az = float(agent[0]), float(agent[-1])
            self._disc(img, ax, az, 0.15, AGENT)
            if agent_heading is not None:
                for t in np.linspace(0, 0.4, 12):
                    self._disc(img, ax - math.sin(agent_heading) * t, az - math.cos(agent_heading) * t, 0.04, AGENT)
        return img


def top_down_map(scene: Scene, navigable: np.ndarray | None = None, path=(), goal=None, agent=None,
                 agent_heading: float | None = None, max_size: int = 512) -> np.ndarray:
    """RGB uint8 image of the scene with a path (world (x, z) points), the goal and the agent."""
    m = TopDownMap(scene, navigable, max_size)
    for a, b in zip(path, path[1:]):
        m.add_segment(a, b)
    return m.render(goal, agent, agent_heading)
