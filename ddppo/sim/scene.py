"""Scenes of the embedded simulator: a flat floor plan on a square grid, saved as a versioned ``.npz``.

A scene is 2.5-D: every occupied cell is a full-height wall or box, so depth and RGB are exact for that geometry.
Grid row ``j`` runs along world z and column ``i`` along world x; cell (j, i) covers
x in [origin_x + i*cell, origin_x + (i+1)*cell) and likewise for z. The floor is the plane y = 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddppo.io.atomic import atomic_open

FORMAT = "ddppo-scene"
VERSION = 1
FREE, WALL, OBJECT = 0, 1, 2


@dataclass
class Scene:
    """One floor plan.

    ``material`` holds, for a free cell, the index of its room (floor and wall colours in ``room_colors``) and,
    for an object cell, the index of the object's colour in ``object_colors``. Wall cells carry no colour of
    their own: a wall is painted with the colour of the room it is seen from.
    """

    name: str
    cell_size: float
    origin: tuple[float, float]  # world (x, z) of the grid's corner
    occupancy: np.ndarray  # uint8 [H, W]: FREE, WALL or OBJECT
    material: np.ndarray  # int32 [H, W]
    room_colors: np.ndarray  # uint8 [R, 2, 3]: floor and wall colour of each room
    object_colors: np.ndarray  # uint8 [K, 3]
    ceiling_height: float = 2.6

    @property
    def shape(self) -> tuple[int, int]:
        return self.occupancy.shape

    @property
    def extent(self) -> tuple[float, float]:
        """Size in metres along x and z."""
        return self.shape[1] * self.cell_size, self.shape[0] * self.cell_size

    def world_to_cell(self, x, z):
        i = np.floor((np.asarray(x) - self.origin[0]) / self.cell_size).astype(np.int64)
        j = np.floor((np.asarray(z) - self.origin[1]) / self.cell_size).astype(np.int64)
        return j, i

    def nearest_geometry(self, x: float, z: float, window: int = 8) -> tuple[float, bool]:
        """Metres from (x, z) to the nearest occupied cell's square within ``window`` cells (inf if none), by brute
        force over the squares, and whether that nearest point is a corner of the geometry (a convex one: on a
        face, the nearest square is straight across)."""
        c = self.cell_size
        j, i = self.world_to_cell(x, z)
        js, is_ = np.mgrid[max(j - window, 0): j + window + 1, max(i - window, 0): i + window + 1]
        inside = (js < self.shape[0]) & (is_ < self.shape[1])
        js, is_ = js[inside], is_[inside]
        occupied = self.occupancy[js, is_] != FREE
        if not occupied.any():
            return float("inf"), False
        x0 = self.origin[0] + is_[occupied] * c
        z0 = self.origin[1] + js[occupied] * c
        dx = np.maximum(np.maximum(x0 - x, x - (x0 + c)), 0.0)
        dz = np.maximum(np.maximum(z0 - z, z - (z0 + c)), 0.0)
        d = np.hypot(dx, dz)
        k = int(d.argmin())
        faces = (d <= d[k] + 1e-9) & ((dx == 0) | (dz == 0))
        return float(d[k]), bool(not faces.any())

    def cell_center(self, j, i):
        return (
            self.origin[0] + (np.asarray(i) + 0.5) * self.cell_size,
            self.origin[1] + (np.asarray(j) + 0.5) * self.cell_size,
        )

    def validate(self, source: str = "scene") -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.occupancy.ndim != 2 or self.occupancy.dtype != np.uint8:
            raise ValueError(f"{source}: field 'occupancy' must be a 2-D uint8 array")
        h, w = self.occupancy.shape
        if h < 8 or w < 8 or h > 4096 or w > 4096:
            raise ValueError(f"{source}: field 'occupancy' has shape {(h, w)}; expected 8..4096 cells a side")
        if not np.isin(self.occupancy, (FREE, WALL, OBJECT)).all():
            raise ValueError(f"{source}: field 'occupancy' holds values other than 0 (free), 1 (wall), 2 (object)")
        if self.material.shape != (h, w):
            raise ValueError(f"{source}: field 'material' has shape {self.material.shape}, expected {(h, w)}")
        if not (0.005 <= self.cell_size <= 1.0):
            raise ValueError(f"{source}: field 'cell_size' = {self.cell_size} m is outside [0.005, 1]")
        if not (1.5 <= self.ceiling_height <= 20.0):
            raise ValueError(f"{source}: field 'ceiling_height' = {self.ceiling_height} m is outside [1.5, 20]")
        if self.room_colors.ndim != 3 or self.room_colors.shape[1:] != (2, 3) or len(self.room_colors) == 0:
            raise ValueError(f"{source}: field 'room_colors' must have shape [R, 2, 3] with R >= 1")
        if self.object_colors.ndim != 2 or self.object_colors.shape[1] != 3:
            raise ValueError(f"{source}: field 'object_colors' must have shape [K, 3]")
        free = self.occupancy == FREE
        if not free.any():
            raise ValueError(f"{source}: field 'occupancy' has no free cell")
        rooms = self.material[free]
        if rooms.min() < 0 or rooms.max() >= len(self.room_colors):
            raise ValueError(f"{source}: field 'material' names a room outside room_colors for a free cell")
        objects = self.material[self.occupancy == OBJECT]
        if objects.size and (objects.min() < 0 or objects.max() >= len(self.object_colors)):
            raise ValueError(f"{source}: field 'material' names a colour outside object_colors for an object cell")
        if not all(np.isfinite(self.origin)):
            raise ValueError(f"{source}: field 'origin' must be finite")


def save_scene(scene: Scene, path: str | os.PathLike) -> Path:
    """Write atomically: a reader never sees a half-written file."""
    scene.validate(str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": scene.name,
        "cell_size": scene.cell_size,
        "origin": list(scene.origin),
        "ceiling_height": scene.ceiling_height,
    }
    with atomic_open(path) as f:
        np.savez_compressed(
                f,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            occupancy=scene.occupancy,
            material=scene.material.astype(np.int32),
            room_colors=scene.room_colors,
            object_colors=scene.object_colors,
        )
    return path


def load_scene(path: str | os.PathLike) -> Scene:
    """Read and validate a scene file; any problem is one ValueError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # zip and npy errors come in many types; all mean the same to the user
        raise ValueError(f"scene file {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    for key in ("meta", "occupancy", "material", "room_colors", "object_colors"):
        if key not in arrays:
            raise ValueError(f"scene file {path}: missing field '{key}'")
    try:
        meta = json.loads(arrays["meta"].tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"scene file {path}: field 'meta' is not JSON") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"scene file {path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"scene file {path}: field 'version' is {meta.get('version')!r}; this ddppo reads {VERSION}")
    try:
        scene = Scene(
            name=str(meta["name"]),
            cell_size=float(meta["cell_size"]),
            origin=(float(meta["origin"][0]), float(meta["origin"][1])),
            occupancy=arrays["occupancy"],
            material=arrays["material"].astype(np.int32),
            room_colors=arrays["room_colors"].astype(np.uint8),
            object_colors=arrays["object_colors"].astype(np.uint8),
            ceiling_height=float(meta["ceiling_height"]),
        )
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"scene file {path}: field {e} in 'meta' is missing or malformed") from None
    scene.validate(f"scene file {path}")
    return scene


def random_colors(rng: np.random.Generator, n: int, lo: int = 40, hi: int = 235) -> np.ndarray:
    return rng.integers(lo, hi, size=(n, 3), dtype=np.int64).astype(np.uint8)
