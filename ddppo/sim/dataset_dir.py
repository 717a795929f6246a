"""An embedded PointNav dataset on disk: ``scenes/{name}.npz`` plus ``{split}/{split}.json.gz`` per split.

Generation writes into a temporary directory renamed into place at the end, so an interrupted run never leaves
a half dataset where a complete one is expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ddppo.sim.dataset import (
    Episode,
    check_episodes_in_scenes,
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


PARALLEL_MIN_EPISODES = 1000
"""Splits with fewer episodes are generated in this process: a worker's start-up (~3 s of imports) would cost more
than it saves (bench/LOG.md has the timings)."""


def _generate_scene(k: int, *, split: str, base_seed: int, plan: FloorPlanConfig, n_eps: int, episodes_per_goal: int,
                    min_geodesic: float, max_geodesic: float, out: Path | str) -> list[Episode]:
    """Scene ``k`` of ``split``: its floor plan, episodes (numbered from 0) and stored geodesic fields, written under
    ``out``. Everything derives from (base_seed, split, k), so scenes can be generated in any order or process."""
    name, out = f"{split}_{k:04d}", Path(out)
    seed = scene_seed(base_seed, split, k)
    scene = generate_floor_plan(seed, name, plan)
    save_scene(scene, out / "scenes" / f"{name}.npz")
    nav = NavGrid(scene)
    rng = np.random.default_rng(seed.spawn(1)[0])
    cache = GeodesicCache(max_bytes=2**40)  # keep every field: they are saved below
    episodes = generate_episodes(nav, n_eps, rng, scene_id=name, episodes_per_goal=episodes_per_goal,
                                 min_geodesic=min_geodesic, max_geodesic=max_geodesic, cache=cache)
    used = {(e.goal_position[0], e.goal_position[2]) for e in episodes}
    GeodesicStore.write(geodesic_store_path(out, split, name), {goal_key(*g): cache.get(nav, *g) for g in used})
    return episodes


def _parts_path(out: Path | str, split: str, k: int) -> Path:
    return Path(out) / ".parts" / f"{split}_{k:04d}.json.gz"


def _generate_scenes_in_workers(job: dict, n_scenes: int, workers: int) -> list[list[Episode]]:
    """Scenes k = w, w + workers, ... of a split in worker w, each worker a fresh ``python -m ddppo.sim.dataset_dir``
    process; each scene's episodes come back through a file. (multiprocessing would fork this process's torch and
    numba threads, or with spawn re-run the caller's ``__main__``: a script without a main guard would recurse.)"""
    spec = json.dumps({**job, "plan": dataclasses.asdict(job["plan"]), "out": str(job["out"])})
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "ddppo.sim.dataset_dir", spec]
    procs = [subprocess.Popen([*command, str(w), str(workers), str(n_scenes)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env) for w in range(workers)]
    try:
        failures = []
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
                failures.append(f"worker exited with code {proc.returncode}: {last}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failures:
        raise RuntimeError(f"dataset generation, split {job['split']}: {failures[0]}")
    per_scene = [load_episodes(_parts_path(job["out"], job["split"], k)) for k in range(n_scenes)]
    shutil.rmtree(Path(job["out"]) / ".parts")
    return per_scene


def _worker_main(argv: list[str]) -> None:
    """``python -m ddppo.sim.dataset_dir JOB_JSON W WORKERS N_SCENES``: the scenes of one generation worker."""
    job = json.loads(argv[0])
    job["plan"] = FloorPlanConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["plan"].items()})
    w, workers, n_scenes = (int(a) for a in argv[1:4])
    for k in range(w, n_scenes, workers):
        save_episodes(_generate_scene(k, **job), _parts_path(job["out"], job["split"], k))


def generation_workers(n_scenes: int, episodes_per_scene: int) -> int:
    """Processes for a split: one per usable core (at most one per scene), none (this process) for small splits."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, n_scenes) if n_scenes * episodes_per_scene >= PARALLEL_MIN_EPISODES else 1


def generate_dataset(out_dir: str | Path, cfg, force: bool = False, log=print, workers: int | None = None) -> Path:
    """Scenes and episodes for every split named in ``cfg.scenes`` (a DatasetConfig), scenes generated in ``workers``
    processes (default: ``generation_workers``); the result does not depend on the number of processes."""
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
            n_scenes = int(n_scenes)
            job = dict(split=split, base_seed=int(cfg.seed), plan=plan, n_eps=int(cfg.episodes_per_scene.get(split, 0)),
                       episodes_per_goal=int(cfg.episodes_per_goal), min_geodesic=float(cfg.min_geodesic),
                       max_geodesic=float(cfg.max_geodesic), out=tmp)
            n_workers = min(workers or generation_workers(n_scenes, job["n_eps"]), n_scenes)
            if n_workers > 1:
                per_scene = _generate_scenes_in_workers(job, n_scenes, n_workers)
            else:
                per_scene = [_generate_scene(k, **job) for k in range(n_scenes)]
            # episode ids run over the whole split, in scene order
            episodes = [dataclasses.replace(e, episode_id=str(i))
                        for i, e in enumerate(e for scene_eps in per_scene for e in scene_eps)]
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
    check_episodes_in_scenes(episodes, navs, lambda k: f"dataset file {path}: episode {k}")
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


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
