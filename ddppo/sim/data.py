"""An embedded PointNav dataset on disk: ``scenes/{name}.npz`` plus ``{split}/{split}.json.gz`` per split.

Generation writes into a temporary directory renamed into place at the end, so an interrupted run never leaves
a half dataset where a complete one is expected.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ddppo.sim.dataset import (
    Episode,
    check_episode_in_scene,
    generate_episodes,
    load_episodes,
    save_episodes,
    scene_name,
)
from ddppo.sim.floorplan import FloorPlanConfig, generate_floor_plan, scene_seed
from ddppo.sim.navmesh import GeodesicCache, GeodesicStore, NavGrid, goal_key
from ddppo.sim.scene import load_scene, save_scene

SPLITS = ("train", "val", "test")


def episodes_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / split / f"{split}.json.gz"


def geodesic_store_path(data_dir: str | Path, split: str, scene: str) -> Path:
    return Path(data_dir) / "geodesic" / split / f"{scene}.npz"


def has_dataset(data_dir: str | Path, split: str) -> bool:
    return episodes_path(data_dir, split).is_file()


def generate_dataset(out_dir: str | Path, cfg, force: bool = False, log=print) -> Path:
    """Scenes and episodes for every split named in ``cfg.scenes`` (a DatasetConfig)."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"dataset directory {out} exists; pass --force to replace it")
    unknown = set(cfg.scenes) - set(SPLITS)
    if unknown:
        raise ValueError(f"dataset.scenes: unknown split(s) {sorted(unknown)}; use {list(SPLITS)}")
    plan = FloorPlanConfig(min_extent=cfg.min_extent, max_extent=cfg.max_extent, max_rooms=cfg.max_rooms,
                           objects_per_room=(0, cfg.max_objects_per_room))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    t0 = time.perf_counter()
    try:
        for split, n_scenes in cfg.scenes.items():
            n_eps = int(cfg.episodes_per_scene.get(split, 0))
            episodes: list[Episode] = []
            for k in range(int(n_scenes)):
                name = f"{split}_{k:04d}"
                seed = scene_seed(cfg.seed, split, k)
                scene = generate_floor_plan(seed, name, plan)
                save_scene(scene, tmp / "scenes" / f"{name}.npz")
                nav = NavGrid(scene)
                rng = np.random.default_rng(seed.spawn(1)[0])
                cache = GeodesicCache(max_bytes=2**40)  # keep every field: they are saved below
                new = generate_episodes(
                    nav, n_eps, rng, scene_id=name, first_id=len(episodes),
                    episodes_per_goal=cfg.episodes_per_goal, min_geodesic=cfg.min_geodesic,
                    max_geodesic=cfg.max_geodesic, cache=cache,
                )
                used = {(e.goal_position[0], e.goal_position[2]) for e in new}
                fields = {goal_key(*g): cache.get(nav, *g) for g in used}
                GeodesicStore.write(geodesic_store_path(tmp, split, name), fields)
                episodes += new
            save_episodes(episodes, episodes_path(tmp, split))
            log(f"dataset: {split}: {n_scenes} scenes, {len(episodes)} episodes ({time.perf_counter() - t0:.1f} s)")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_split(data_dir: str | Path, split: str, scenes_dir: str | Path | None = None):
    """Episodes of a split and the NavGrid of every scene they use. Every episode is checked against its scene
    here, so a bad one deep in the file fails at start, naming the file, not when an environment reaches it."""
    path = episodes_path(data_dir, split)
    episodes = load_episodes(path)
    scenes_dir = Path(scenes_dir) if scenes_dir else Path(data_dir) / "scenes"
    navs = {}
    for name in sorted({scene_name(e.scene_id) for e in episodes}):
        navs[name] = NavGrid(load_scene(scenes_dir / f"{name}.npz"),
                             store=GeodesicStore(geodesic_store_path(data_dir, split, name)))
    for k, ep in enumerate(episodes):
        check_episode_in_scene(ep, navs[scene_name(ep.scene_id)], f"dataset file {path}: episode {k}")
    return episodes, navs


def ensure_dataset(task_cfg, dataset_cfg, log=print) -> None:
    """Generate the default embedded dataset on first use, so ``ddppo train`` works on a fresh machine."""
    if has_dataset(task_cfg.data_dir, task_cfg.split):
        return
    if not task_cfg.generate_if_missing:
        raise FileNotFoundError(
            f"dataset file {episodes_path(task_cfg.data_dir, task_cfg.split)} does not exist "
            "(embedded simulator: run `ddppo dataset generate` or set task.generate_if_missing=true; "
            "habitat: download the PointNav dataset, see README 'Habitat backend')"
        )
    if Path(task_cfg.data_dir).exists() and any(Path(task_cfg.data_dir).iterdir()):
        raise FileNotFoundError(
            f"dataset directory {task_cfg.data_dir} exists but has no split {task_cfg.split!r}; "
            "refusing to overwrite it"
        )
    log(f"dataset: none at {task_cfg.data_dir}; generating the embedded PointNav dataset")
    generate_dataset(task_cfg.data_dir, dataset_cfg, force=True, log=log)
