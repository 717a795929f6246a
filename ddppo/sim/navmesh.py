"""Where the agent can stand, and how far it has to walk: our counterpart of habitat-sim's navmesh.

Navigable cells are free cells whose centre is at least the agent radius from every occupied cell, so the agent's
disc never overlaps geometry. Where the agent may stand is the same rule between cell centres: the clearance
sampled at the centres, interpolated bilinearly, at least the radius (docs/design.md, "Kinematics"). That boundary
is smooth where the cells' is a staircase, so an agent slides round a box's corner as on habitat's navmesh instead
of sticking in a one-cell notch; it holds every navigable centre and the segment between two 4-adjacent ones, so
the cells' islands stay connected for the agent.

Geodesic distances come from the fast marching method (scikit-fmm, second order) on a grid ``factor`` times
coarser than the scene (0.1 m by default; a coarse cell is navigable when any of its fine cells is, which cannot
bridge two islands because walls plus the radius margin are wider than a coarse cell). FMM
solves the eikonal equation with the Euclidean metric, so straight and diagonal runs carry no 4/8-connectivity
bias; its error against the true shortest path is within 3% on our test mazes (tests/test_navmesh.py), mostly
from the discretised corners.
"""

from __future__ import annotations

import io
import math
import mmap
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ddppo.io.atomic import atomic_open
from ddppo.sim.scene import FREE, Scene

AGENT_RADIUS = 0.1
AGENT_HEIGHT = 1.5
SENSOR_HEIGHT = 1.25
NEAR_GOAL = 0.3
"""Metres: closer than this to its goal, an agent's geodesic distance is the straight-line distance."""


@dataclass
class NavGrid:
    scene: Scene
    agent_radius: float = AGENT_RADIUS
    factor: int = 2
    """Geodesic grid cell = factor * scene cell."""
    store: GeodesicStore | None = None
    """Precomputed fields of this scene's goals, when the dataset has them."""
    navigable: np.ndarray = field(init=False)  # bool [H, W]
    island: np.ndarray = field(init=False)  # int32 [H, W]; -1 off the navigable set
    island_sizes: np.ndarray = field(init=False)  # cells per island
    clearance: np.ndarray = field(init=False)
    """float32 [H, W]: metres from each cell centre to the nearest occupied cell's square (0 on occupied cells)."""

    def __post_init__(self):
        free = self.scene.occupancy == FREE
        # exact distance from each cell centre to the square of its nearest occupied cell (nearest by centre;
        # measuring to the square's edge rather than subtracting half a cell keeps diagonal corners honest)
        _, (nj, ni) = ndimage.distance_transform_edt(free, return_indices=True)
        jj, ii = np.indices(free.shape)
        dj = np.maximum(np.abs(nj - jj) - 0.5, 0.0)
        di = np.maximum(np.abs(ni - ii) - 0.5, 0.0)
        clearance = np.where(free, np.hypot(dj, di) * self.scene.cell_size, 0.0)
        self.clearance = clearance.astype(np.float32)
        self.navigable = free & (clearance >= self.agent_radius - 1e-6)
        labels, n = ndimage.label(self.navigable)
        self.island = labels.astype(np.int32) - 1
        self.island_sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        f = self.factor
        h, w = self.navigable.shape
        padded = np.zeros((-(-h // f) * f, -(-w // f) * f), bool)
        padded[:h, :w] = self.navigable
        self.coarse_navigable = padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f).any(axis=(1, 3))
        self.geodesic_cell = self.scene.cell_size * f

    def is_navigable(self, x, z) -> np.ndarray:
        j, i = self.scene.world_to_cell(x, z)
        h, w = self.navigable.shape
        inside = (j >= 0) & (j < h) & (i >= 0) & (i < w)
        out = np.zeros(np.shape(j), bool)
        out[inside] = self.navigable[j[inside], i[inside]]
        return out

    def island_of(self, x, z) -> int:
        j, i = self.scene.world_to_cell(x, z)
        if not self.is_navigable(x, z):
            return -1
        return int(self.island[j, i])

    def sample_navigable(self, rng: np.random.Generator, n: int = 1, island: int | None = None) -> np.ndarray:
        """Uniform points (x, z) inside navigable cells, optionally on one island."""
        mask = self.navigable if island is None else self.island == island
        js, is_ = np.nonzero(mask)
        if len(js) == 0:
            raise ValueError(f"scene {self.scene.name}: no navigable cell to sample from")
        k = rng.integers(0, len(js), size=n)
        c = self.scene.cell_size
        # stay off the cell edges so the point is unambiguously in its cell
        x, z = self.scene.cell_center(js[k], is_[k])
        jitter = rng.uniform(-0.4 * c, 0.4 * c, size=(2, n))
        return np.stack([x + jitter[0], z + jitter[1]], axis=-1)

    def geodesic_field(self, goal_x: float, goal_z: float) -> np.ndarray:
        """Geodesic distance (metres) from every geodesic-grid cell centre to the goal; inf where unreachable."""
        scene = self.scene
        if not self.is_navigable(goal_x, goal_z):
            raise ValueError(f"scene {scene.name}: goal ({goal_x:.3f}, {goal_z:.3f}) is not navigable")
        c = self.geodesic_cell
        h, w = self.coarse_navigable.shape
        xs = scene.origin[0] + (np.arange(w) + 0.5) * c
        zs = scene.origin[1] + (np.arange(h) + 0.5) * c
        euclid = np.hypot(xs[None, :] - goal_x, zs[:, None] - goal_z)
        # Within NEAR_GOAL of the goal the distance is Euclidean (no obstacle fits between two navigable points
        # that close); FMM starts from that circle, which spans several cells and so is well resolved.
        r0 = NEAR_GOAL
        phi = np.ma.MaskedArray(euclid - r0, ~self.coarse_navigable)
        import skfmm  # here, not at the top: runs on stored geodesic fields need no FMM (nor its wheel)

        dist = skfmm.distance(phi, dx=c, order=2)
        out = np.full((h, w), np.inf, np.float32)
        valid = ~np.ma.getmaskarray(dist)
        out[valid] = np.asarray(dist)[valid] + r0
        near = (euclid <= r0) & self.coarse_navigable
        out[near] = euclid[near]
        return out

    def geodesic_distance(self, start_xz, goal_xz) -> float:
        field_ = self.geodesic_field(*goal_xz)
        return float(self.sample(field_, np.asarray([start_xz[0]]), np.asarray([start_xz[1]]), goal_xz)[0])

    def sample(self, field_: np.ndarray, x, z, goal=None) -> np.ndarray:
        return sample_field(field_, self.scene.origin, self.geodesic_cell, x, z, goal)


def sample_field(field_: np.ndarray, origin, cell: float, x, z, goal=None) -> np.ndarray:
    """Bilinear interpolation over the finite neighbours, Euclidean within NEAR_GOAL of ``goal`` (numpy twin of
    the simulator's lookups in ddppo.sim.physics)."""
    gx = (np.asarray(x, np.float64) - origin[0]) / cell - 0.5
    gz = (np.asarray(z, np.float64) - origin[1]) / cell - 0.5
    i0, j0 = np.floor(gx).astype(np.int64), np.floor(gz).astype(np.int64)
    fx, fz = gx - i0, gz - j0
    h, w = field_.shape
    num = np.zeros_like(gx)
    den = np.zeros_like(gx)
    for dj, di, wt in ((0, 0, (1 - fz) * (1 - fx)), (0, 1, (1 - fz) * fx), (1, 0, fz * (1 - fx)), (1, 1, fz * fx)):
        jj, ii = np.clip(j0 + dj, 0, h - 1), np.clip(i0 + di, 0, w - 1)
        v = field_[jj, ii].astype(np.float64)
        ok = np.isfinite(v)
        num += np.where(ok, v * wt, 0.0)
        den += np.where(ok, wt, 0.0)
    out = np.where(den > 1e-9, num / np.maximum(den, 1e-9), np.inf)
    if goal is not None:
        euclid = np.hypot(np.asarray(x, np.float64) - goal[0], np.asarray(z, np.float64) - goal[1])
        out = np.where(euclid < NEAR_GOAL, euclid, out)
    return out


def goal_key(goal_x: float, goal_z: float) -> tuple[float, float]:
    return round(float(goal_x), 4), round(float(goal_z), 4)


class GeodesicStore:
    """Geodesic fields precomputed by ``ddppo dataset generate``: one ``.npz`` per scene, distances in millimetres
    as uint16 (65535 = unreachable), so starting an episode reads a field (from a memory map) instead of running
    FMM."""

    UNREACHABLE = 65535

    def __init__(self, path: Path):
        self.path = Path(path)
        self._npz = None
        self._map: mmap.mmap | None = None
        self._spans: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        self._index: dict[tuple[float, float], str] | None = None

    @classmethod
    def write(cls, path: Path, fields: dict[tuple[float, float], np.ndarray]) -> None:
        arrays = {"goals": np.array(sorted(fields), np.float64).reshape(-1, 2)}
        for k, goal in enumerate(sorted(fields)):
            mm = np.where(np.isfinite(fields[goal]), np.round(fields[goal] * 1000.0), cls.UNREACHABLE)
            arrays[f"g{k}"] = np.minimum(mm, cls.UNREACHABLE).astype(np.uint16)
        with atomic_open(path) as f:
            np.savez(f, **arrays)  # uncompressed: distance fields barely compress, and inflating costs resets

    def _open(self) -> None:
        self._index = {}
        if not self.path.is_file():
            return
        try:
            self._npz = np.load(self.path, allow_pickle=False)
            goals = self._npz["goals"]
        except Exception:  # an unreadable store only costs speed: fields are then computed
            return
        try:
            self._spans = self._array_spans()
        except (OSError, ValueError, struct.error):  # np.load still reads every member
            self._spans = {}
        self._index = {goal_key(x, z): f"g{k}" for k, (x, z) in enumerate(goals)}

    def _array_spans(self) -> dict[str, tuple[int, tuple[int, ...], np.dtype]]:
        """Where each uncompressed member's array lies in the file (offset, shape, dtype), so that a field is read
        from a memory map rather than through np.load's zip member and header parsing, an order of magnitude slower:
        episode starts on first visits of goals are most of a short run's resets. Members it cannot place (compressed,
        another .npy version) are left to np.load."""
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        spans, headers = {}, {}
        for info in self._npz.zip.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                continue
            # local file header: 30 bytes, then the name and the extra field, then the member's bytes (a .npy)
            name_len, extra_len = struct.unpack_from("<HH", self._map, info.header_offset + 26)
            start = info.header_offset + 30 + name_len + extra_len
            version = self._map[start + 6]
            if version not in (1, 2):
                continue
            size_bytes = 2 if version == 1 else 4  # of the header length, after magic (6 bytes) and version (2)
            header_len = int.from_bytes(self._map[start + 8: start + 8 + size_bytes], "little")
            data = start + 8 + size_bytes + header_len
            header = bytes(self._map[start:data])
            if header not in headers:  # the members of one scene share their header: parse it once
                fp = io.BytesIO(header)
                read = np.lib.format.read_array_header_1_0 if version == 1 else np.lib.format.read_array_header_2_0
                np.lib.format.read_magic(fp)
                headers[header] = read(fp)
            shape, fortran, dtype = headers[header]
            if not fortran and not dtype.hasobject:
                spans[info.filename[:-4]] = (data, shape, dtype)
        return spans

    def get(self, goal_x: float, goal_z: float) -> np.ndarray | None:
        if self._index is None:
            self._open()
        name = self._index.get(goal_key(goal_x, goal_z))
        if name is None:
            return None
        span = self._spans.get(name)
        if span is None:
            mm = self._npz[name]
        else:
            offset, shape, dtype = span
            mm = np.frombuffer(self._map, dtype, math.prod(shape), offset).reshape(shape)
        return np.where(mm == self.UNREACHABLE, np.inf, mm.astype(np.float32) / 1000.0).astype(np.float32)


class GeodesicCache:
    """LRU of geodesic fields keyed by (scene, goal): episodes that share a goal pay for one field. A field comes
    from the scene's GeodesicStore when the dataset has one (``nav.store``), else from FMM."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self._fields: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self.misses = 0
        self.hits = 0
        self.computed = 0

    def get(self, nav: NavGrid, goal_x: float, goal_z: float) -> np.ndarray:
        key = (nav.scene.name, *goal_key(goal_x, goal_z))
        hit = self._fields.get(key)
        if hit is not None:
            self.hits += 1
            self._fields.move_to_end(key)
            return hit
        self.misses += 1
        f = nav.store.get(goal_x, goal_z) if nav.store is not None else None
        if f is None:
            f = nav.geodesic_field(goal_x, goal_z)
            self.computed += 1
        self._fields[key] = f
        self._bytes += f.nbytes
        while self._bytes > self.max_bytes and len(self._fields) > 1:
            _, old = self._fields.popitem(last=False)
            self._bytes -= old.nbytes
        return f

    def items(self):
        return self._fields.items()
