"""Exact geometry of a scene's occupancy grid, by brute force: the independent truth the kinematics tests measure
the simulator's clearance against."""

from __future__ import annotations

import math

import numpy as np


def distance_to_geometry(scene, x: float, z: float, window: int = 8) -> float:
    """Metres from (x, z) to the nearest occupied cell's square within ``window`` cells (inf if none)."""
    c = scene.cell_size
    j, i = scene.world_to_cell(x, z)
    js, is_ = np.mgrid[max(j - window, 0): j + window + 1, max(i - window, 0): i + window + 1]
    js, is_ = js.ravel(), is_.ravel()
    inside = (js < scene.shape[0]) & (is_ < scene.shape[1])
    js, is_ = js[inside], is_[inside]
    occupied = scene.occupancy[js, is_] != 0
    if not occupied.any():
        return math.inf
    x0 = scene.origin[0] + is_[occupied] * c
    z0 = scene.origin[1] + js[occupied] * c
    dx = np.maximum(np.maximum(x0 - x, x - (x0 + c)), 0.0)
    dz = np.maximum(np.maximum(z0 - z, z - (z0 + c)), 0.0)
    return float(np.hypot(dx, dz).min())
