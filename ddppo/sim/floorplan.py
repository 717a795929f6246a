"""Procedural indoor floor plans: rooms from a binary space partition, doors in every split wall, corridors,
and full-height clutter. Deterministic in the seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddppo.sim.scene import FREE, OBJECT, WALL, Scene, random_colors

SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class FloorPlanConfig:
    """Knobs of the generator (metres unless stated)."""

    min_extent: float = 5.0
    """Smallest side of the whole plan."""
    max_extent: float = 30.0
    """Largest side of the whole plan."""
    min_room: float = 2.2
    """Rooms are not split below twice this size."""
    max_rooms: int = 12
    corridor_prob: float = 0.3
    """Chance that a split carves a corridor between its halves instead of one wall."""
    corridor_width: tuple[float, float] = (1.2, 1.8)
    door_width: tuple[float, float] = (0.9, 1.3)
    wall_thickness: float = 0.15
    objects_per_room: tuple[int, int] = (0, 3)
    object_size: tuple[float, float] = (0.2, 0.8)
    cell_size: float = 0.05


def scene_seed(base_seed: int, split: str, index: int) -> np.random.SeedSequence:
    """Disjoint, reproducible seed streams for the train / val / test scene sets."""
    return np.random.SeedSequence([base_seed, SPLITS[split], index])


def generate_floor_plan(seed, name: str, cfg: FloorPlanConfig | None = None) -> Scene:
    cfg = cfg or FloorPlanConfig()
    rng = np.random.default_rng(seed)
    c = cfg.cell_size

    def cells(m: float) -> int:
        return max(1, int(round(m / c)))

    t = cells(cfg.wall_thickness)
    W = cells(rng.uniform(cfg.min_extent, cfg.max_extent)) + 2 * t
    H = cells(rng.uniform(cfg.min_extent, cfg.max_extent)) + 2 * t
    occ = np.zeros((H, W), np.uint8)
    occ[:t, :] = occ[-t:, :] = occ[:, :t] = occ[:, -t:] = WALL
    leaves, walls, doors = _partition(rng, cfg, cells, (t, t, H - t, W - t), t)
    material = _paint_rooms(occ, leaves, walls, doors, t)
    n_objects = _place_objects(rng, cfg, cells, occ, material, leaves)
    object_colors = random_colors(rng, n_objects)
    room_colors = random_colors(rng, 2 * len(leaves)).reshape(len(leaves), 2, 3)
    scene = Scene(
        name=name,
        cell_size=c,
        origin=(-W * c / 2, -H * c / 2),
        occupancy=occ,
        material=material,
        room_colors=room_colors,
        object_colors=object_colors,
        ceiling_height=float(np.round(rng.uniform(2.4, 3.0), 2)),
    )
    scene.validate(f"generated scene {name}")
    return scene


Rect = tuple[int, int, int, int]
"""(j0, i0, j1, i1): interior cells [j0, j1) x [i0, i1)."""
Span = tuple[str, int, int, int]
"""(axis "row" | "col", line start, span lo, span hi): a wall, or a door cut through one."""


def _partition(rng, cfg: FloorPlanConfig, cells, plan: Rect, t: int) -> tuple[list[Rect], list[Span], list[Span]]:
    """Binary space partition of ``plan`` into rooms (and corridors), with the walls between them and a door in
    each wall: (rooms, walls, doors)."""
    min_room = cells(cfg.min_room)
    leaves: list[Rect] = []
    walls: list[Span] = []
    doors: list[Span] = []
    stack = [plan]
    while stack:
        j0, i0, j1, i1 = stack.pop()
        h, w = j1 - j0, i1 - i0
        room_budget = len(leaves) + len(stack) + 1 < cfg.max_rooms
        splittable = max(h, w) >= 2 * min_room + t
        if not (room_budget and splittable) or (max(h, w) < 3 * min_room and rng.random() < 0.3):
            leaves.append((j0, i0, j1, i1))
            continue
        along_z = h >= w  # split the longer side: the wall runs along x when cutting rows
        length, lo_edge = (h, j0) if along_z else (w, i0)
        corridor = cells(rng.uniform(*cfg.corridor_width))
        use_corridor = rng.random() < cfg.corridor_prob and length >= 2 * min_room + corridor + 2 * t
        gap = corridor + 2 * t if use_corridor else t
        pos = _split_position(rng, lo_edge + min_room, lo_edge + length - min_room - gap, gap, t, doors, along_z,
                              (j0, i0, j1, i1))
        if pos is None:
            leaves.append((j0, i0, j1, i1))
            continue
        span = (i0, i1) if along_z else (j0, j1)
        axis = "row" if along_z else "col"
        lines = [pos, pos + corridor + t] if use_corridor else [pos]
        for line in lines:
            walls.append((axis, line, *span))
            door = cells(rng.uniform(*cfg.door_width))
            if span[1] - span[0] - 2 * t > door:
                d0 = int(rng.integers(span[0] + t, span[1] - t - door + 1))
                doors.append((axis, line, d0, d0 + door))
        if along_z:
            first, second = (j0, i0, pos, i1), (pos + gap, i0, j1, i1)
            middle = (pos + t, i0, pos + t + corridor, i1)
        else:
            first, second = (j0, i0, j1, pos), (j0, pos + gap, j1, i1)
            middle = (j0, pos + t, j1, pos + t + corridor)
        if use_corridor:
            leaves.append(middle)
        stack.extend([first, second])
    return leaves, walls, doors


def _paint_rooms(occ: np.ndarray, leaves: list[Rect], walls: list[Span], doors: list[Span], t: int) -> np.ndarray:
    """Walls and doors into ``occ``; returns each cell's room index (the material)."""
    for axis, line, lo, hi in walls:
        if axis == "row":
            occ[line : line + t, lo:hi] = WALL
        else:
            occ[lo:hi, line : line + t] = WALL
    for axis, line, lo, hi in doors:
        if axis == "row":
            occ[line : line + t, lo:hi] = FREE
        else:
            occ[lo:hi, line : line + t] = FREE
    material = np.zeros(occ.shape, np.int32)
    for r, (j0, i0, j1, i1) in enumerate(leaves):
        material[j0:j1, i0:i1] = r
    # door cells belong to the room on their low side; walls painted from either side keep their own room colour
    for axis, line, lo, hi in doors:
        if axis == "row":
            material[line : line + t, lo:hi] = material[max(line - 1, 0), lo:hi]
        else:
            material[lo:hi, line : line + t] = material[lo:hi, max(line - 1, 0)][:, None]
    return material


def _place_objects(rng, cfg: FloorPlanConfig, cells, occ: np.ndarray, material: np.ndarray,
                   leaves: list[Rect]) -> int:
    """Full-height clutter in each room, away from its walls, into ``occ`` and ``material`` (the object's index);
    returns the number of objects."""
    n_objects = 0
    margin = cells(0.6)
    for j0, i0, j1, i1 in leaves:
        for _ in range(int(rng.integers(cfg.objects_per_room[0], cfg.objects_per_room[1] + 1))):
            bh, bw = (cells(rng.uniform(*cfg.object_size)) for _ in range(2))
            if j1 - j0 - 2 * margin <= bh or i1 - i0 - 2 * margin <= bw:
                continue
            bj = int(rng.integers(j0 + margin, j1 - margin - bh + 1))
            bi = int(rng.integers(i0 + margin, i1 - margin - bw + 1))
            occ[bj : bj + bh, bi : bi + bw] = OBJECT
            material[bj : bj + bh, bi : bi + bw] = n_objects
            n_objects += 1
    return n_objects


def _split_position(rng, lo, hi, gap, t, doors, along_z, rect):
    """A split line in [lo, hi] whose walls (``gap`` cells thick) do not run into a door of the rectangle's
    boundary walls."""
    if hi < lo:
        return None
    j0, i0, j1, i1 = rect
    clearance = 6  # cells kept free between a new wall and an existing door
    blocked = []
    for axis, line, d_lo, d_hi in doors:
        if along_z and axis == "col" and (line + t == i0 or line == i1) and d_hi > j0 and d_lo < j1:
            blocked.append((d_lo, d_hi))
        if not along_z and axis == "row" and (line + t == j0 or line == j1) and d_hi > i0 and d_lo < i1:
            blocked.append((d_lo, d_hi))
    for _ in range(20):
        p = int(rng.integers(lo, hi + 1))
        if not any(p + gap + clearance > a and p - clearance < b for a, b in blocked):
            return p
    return None
