"""PointNav episodes in habitat's ``PointNavDatasetV1`` json.gz schema: read, validate, write, generate."""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddppo.io.atomic import atomic_open
from ddppo.sim.geometry import heading_to_quaternion, quaternion_to_heading
from ddppo.sim.navmesh import GeodesicCache, NavGrid

ISLAND_RADIUS_LIMIT = 1.5  # habitat's generator: the start's island must be at least this "radius"


@dataclass
class Episode:
    episode_id: str
    scene_id: str
    start_position: tuple[float, float, float]
    start_rotation: tuple[float, float, float, float]
    goal_position: tuple[float, float, float]
    geodesic_distance: float
    goal_radius: float | None = None

    @property
    def start_heading(self) -> float:
        return quaternion_to_heading(self.start_rotation)

    def to_json(self) -> dict:
        return {
            "episode_id": self.episode_id,
            "scene_id": self.scene_id,
            "start_position": list(self.start_position),
            "start_rotation": list(self.start_rotation),
            "info": {"geodesic_distance": self.geodesic_distance},
            "goals": [{"position": list(self.goal_position), "radius": self.goal_radius}],
        }


def scene_name(scene_id: str) -> str:
    """Habitat's scene_id is a path ('data/scene_datasets/gibson/Adrian.glb'); ours a bare name. Both -> stem."""
    return Path(scene_id).stem if ("/" in scene_id or "." in scene_id) else scene_id


def _number(value, where: str, name: str) -> float:
    """An optional scalar field (null is handled by the caller): a finite number or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: field '{name}' must be a finite number or null, got {value!r}")
    return float(value)


def _numbers(value, n: int, where: str, name: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{where}: field '{name}' must be a list of {n} numbers, got {value!r}")
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field '{name}' must be a list of {n} numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{where}: field '{name}' holds a non-finite number: {value!r}")
    return out


def parse_episode(raw, where: str) -> Episode:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: an episode must be a JSON object")
    for key in ("episode_id", "scene_id", "start_position", "start_rotation", "goals"):
        if key not in raw:
            raise ValueError(f"{where}: missing field '{key}'")
    where = f"{where} (id {raw['episode_id']!r})"
    goals = raw["goals"]
    if not isinstance(goals, list) or not goals or not isinstance(goals[0], dict) or "position" not in goals[0]:
        raise ValueError(f"{where}: field 'goals' must be a non-empty list of {{'position': [x, y, z]}}")
    rotation = _numbers(raw["start_rotation"], 4, where, "start_rotation")
    try:
        quaternion_to_heading(rotation)
    except ValueError as e:
        raise ValueError(f"{where}: field 'start_rotation': {e}") from None
    info = raw.get("info") or {}
    geo = info.get("geodesic_distance") if isinstance(info, dict) else None
    radius = goals[0].get("radius")
    return Episode(
        episode_id=str(raw["episode_id"]),
        scene_id=str(raw["scene_id"]),
        start_position=_numbers(raw["start_position"], 3, where, "start_position"),
        start_rotation=rotation,
        goal_position=_numbers(goals[0]["position"], 3, where, "goals[0].position"),
        geodesic_distance=float("nan") if geo is None else _number(geo, where, "info.geodesic_distance"),
        goal_radius=None if radius is None else _number(radius, where, "goals[0].radius"),
    )


def _read_json_gz(path: Path) -> dict:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"dataset file {path}: not valid gzip-compressed JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("episodes"), list):
        raise ValueError(f"dataset file {path}: missing field 'episodes' (a list)")
    return data


CONTENT_SCENES_PATH = "{data_path}/content/{scene}.json.gz"
"""habitat-lab's PointNavDatasetV1 default for the per-scene files; a main file's ``content_scenes_path`` field
replaces it. ``data_path`` is the main file's directory."""


def _content_files(path: Path, data: dict) -> list[Path]:
    """habitat-lab's per-scene files of the main file ``path``: when the template's part before ``{scene}`` exists,
    every file in that directory ending with the part after it, in sorted order of scene name (habitat-lab's
    ``content_scenes=["*"]``)."""
    template = data.get("content_scenes_path", CONTENT_SCENES_PATH)
    if not isinstance(template, str) or template.count("{scene}") != 1:
        raise ValueError(f"dataset file {path}: field 'content_scenes_path' must be a string with one '{{scene}}', "
                         f"got {template!r}")
    head, ext = template.split("{scene}")
    try:
        folder = head.format(data_path=path.parent)
        template.format(data_path=path.parent, scene="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"dataset file {path}: field 'content_scenes_path' {template!r}: only {{data_path}} and "
                         f"{{scene}} may be named ({type(e).__name__}: {e})") from None
    if not os.path.exists(folder):
        return []
    if not os.path.isdir(folder):
        raise ValueError(f"dataset file {path}: field 'content_scenes_path' {template!r}: {folder} is not a directory")
    scenes = sorted(name[: -len(ext)] for name in os.listdir(folder) if name.endswith(ext))
    return [Path(template.format(data_path=path.parent, scene=scene)) for scene in scenes]


def load_episodes(path: str | os.PathLike) -> list[Episode]:
    """Read ``{split}.json.gz`` as habitat-lab's PointNavDatasetV1 does: the main file's episodes, then those of
    every per-scene file (``content/{scene}.json.gz`` beside it, or where its ``content_scenes_path`` says)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    data = _read_json_gz(path)
    episodes = [parse_episode(e, f"dataset file {path}: episode {k}") for k, e in enumerate(data["episodes"])]
    for part in _content_files(path, data):
        raw = _read_json_gz(part)["episodes"]
        episodes += [parse_episode(e, f"dataset file {part}: episode {k}") for k, e in enumerate(raw)]
    if not episodes:
        raise ValueError(f"dataset file {path}: holds no episode")
    return episodes


def save_episodes(episodes: list[Episode], path: str | os.PathLike) -> Path:
    path = Path(path)
    payload = json.dumps({"episodes": [e.to_json() for e in episodes]}).encode()
    with atomic_open(path) as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        gz.write(payload)
    return path


def check_episode_in_scene(ep: Episode, nav: NavGrid, where: str) -> None:
    """An episode whose start or goal is off the scene's navigable floor cannot be run: say which."""
    for name, pos in (("start_position", ep.start_position), ("goals[0].position", ep.goal_position)):
        if abs(pos[1]) > 0.5:
            raise ValueError(f"{where} (id {ep.episode_id!r}): field '{name}' y={pos[1]} is not on the floor y=0")
        if not nav.is_navigable(pos[0], pos[2]):
            raise ValueError(
                f"{where} (id {ep.episode_id!r}): field '{name}' ({pos[0]:.2f}, {pos[2]:.2f}) is not navigable "
                f"in scene {nav.scene.name!r}"
            )


def check_episodes_in_scenes(episodes: list[Episode], navs: dict[str, NavGrid], where) -> None:
    """``check_episode_in_scene`` for every episode, vectorised per scene (thousands of episodes in milliseconds);
    the first bad episode raises its error. ``where(k)`` names episode ``k`` in the message."""
    by_scene: dict[str, list[int]] = {}
    for k, ep in enumerate(episodes):
        by_scene.setdefault(scene_name(ep.scene_id), []).append(k)
    first_bad = None
    for name, ks in by_scene.items():
        pos = np.array([(episodes[k].start_position, episodes[k].goal_position) for k in ks])  # [n, 2, xyz]
        ok = (np.abs(pos[..., 1]) <= 0.5) & navs[name].is_navigable(pos[..., 0], pos[..., 2])
        bad = np.flatnonzero(~ok.all(axis=1))
        if len(bad) and (first_bad is None or ks[bad[0]] < first_bad):
            first_bad = ks[bad[0]]
    if first_bad is not None:
        ep = episodes[first_bad]
        check_episode_in_scene(ep, navs[scene_name(ep.scene_id)], where(first_bad))


def ratio_keep_probability(ratio: float) -> float:
    """Habitat's generator keeps near-straight episodes (geodesic/euclid < 1.1) with this probability."""
    return 20.0 * (ratio - 0.98) ** 2


def generate_episodes(nav: NavGrid, n: int, rng: np.random.Generator, *, scene_id: str,
                      first_id: int = 0, episodes_per_goal: int = 4, min_geodesic: float = 1.0,
                      max_geodesic: float = 30.0, cache: GeodesicCache | None = None,
                      max_goals: int = 10_000) -> list[Episode]:
    """Habitat's rules: goal and start navigable and on one island, geodesic in [min, max], near-straight paths
    (geodesic/euclid < 1.1) kept with probability 20 (ratio - 0.98)^2, island of the start not tiny, random yaw.
    Goals are drawn first and several starts tried against each (10 tries per episode, as habitat does)."""
    cache = cache or GeodesicCache()
    out: list[Episode] = []
    big_islands = [
        k for k, size in enumerate(nav.island_sizes) if _island_radius(nav, k) >= ISLAND_RADIUS_LIMIT and size > 0
    ]
    if not big_islands:
        raise ValueError(f"scene {nav.scene.name}: no navigable island of radius >= {ISLAND_RADIUS_LIMIT} m")
    weights = np.array([nav.island_sizes[k] for k in big_islands], float)
    for _ in range(max_goals):
        if len(out) >= n:
            break
        island = big_islands[rng.choice(len(big_islands), p=weights / weights.sum())]
        goal = nav.sample_navigable(rng, 1, island=island)[0]
        field_ = cache.get(nav, goal[0], goal[1])
        for _ in range(episodes_per_goal):
            if len(out) >= n:
                break
            for _try in range(10):
                start = nav.sample_navigable(rng, 1, island=island)[0]
                geo = float(nav.sample(field_, start[:1], start[1:], goal)[0])
                euclid = float(np.hypot(*(start - goal)))
                if not (min_geodesic <= geo <= max_geodesic) or euclid <= 0:
                    continue
                ratio = geo / euclid
                if ratio < 1.1 and rng.random() > ratio_keep_probability(ratio):
                    continue
                yaw = rng.uniform(0, 2 * np.pi)
                out.append(
                    Episode(
                        episode_id=str(first_id + len(out)),
                        scene_id=scene_id,
                        start_position=(float(start[0]), 0.0, float(start[1])),
                        start_rotation=tuple(heading_to_quaternion(yaw)),
                        goal_position=(float(goal[0]), 0.0, float(goal[1])),
                        geodesic_distance=geo,
                        goal_radius=None,
                    )
                )
                break
    if len(out) < n:
        raise ValueError(f"scene {nav.scene.name}: found only {len(out)} of {n} episodes under the generator rules")
    return out


def _island_radius(nav: NavGrid, island: int) -> float:
    js, is_ = np.nonzero(nav.island == island)
    if len(js) == 0:
        return 0.0
    c = nav.scene.cell_size
    return 0.5 * float(np.hypot((js.max() - js.min() + 1) * c, (is_.max() - is_.min() + 1) * c))
