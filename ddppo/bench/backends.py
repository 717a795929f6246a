"""``ddppo bench backends``: the embedded simulator against habitat-sim on the same scenes, episodes, sizes and
actions, measured side by side in one run.

The scenes are an embedded dataset's, exported as meshes for habitat-sim (``ddppo scene export``); both backends are
built by ``make_vector_env`` as the trainer builds them (the embedded one batched in this process, habitat-sim one
simulator process per environment), and step the same random movement actions. Rounds alternate the order of the
two, and the figures are the medians of the rounds, so a shared machine's drift does not pass for a difference."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ddppo.bench.throughput import machine
from ddppo.config import DatasetConfig, load_config
from ddppo.trainer.peak_memory import peak_memory

BENCH_DATASET = DatasetConfig(scenes={"train": 0, "val": 4, "test": 0}, episodes_per_scene={"val": 20},
                              min_extent=4.0, max_extent=10.0, max_rooms=4, max_objects_per_room=2, max_geodesic=12.0)
"""The quickstart's kind of scene (4-10 m, up to 4 rooms) when ``data_dir`` holds no dataset yet."""


def _prepare(data_dir: Path, split: str) -> Path:
    """The embedded dataset (generated when missing) and its export for habitat-sim beside it."""
    from ddppo.sim.dataset_dir import generate_dataset, has_dataset
    from ddppo.sim.scene_export import export_dataset

    if not has_dataset(data_dir, split):
        generate_dataset(data_dir, BENCH_DATASET, log=lambda *_: None)
    exported = data_dir.with_name(data_dir.name + "_habitat")
    if not has_dataset(exported, split):
        export_dataset(data_dir, exported, [split], navmesh=True, log=lambda *_: None)
    return exported


def _rate(env, actions: list[torch.Tensor]) -> float:
    """Env-steps/s over ``actions`` (the episode ends the env's step limit brings are part of the work)."""
    t0 = time.perf_counter()
    for a in actions:
        env.step(a)
    return actions[0].numel() * len(actions) / (time.perf_counter() - t0)


def bench_backends(num_envs: int = 4, resolution: int = 64, sensors=("depth",), steps: int = 200,
                   warmup: int = 50, data_dir: str = "data/pointnav_bench", split: str = "val", rounds: int = 3,
                   episode_steps: int = 100, seed: int = 0) -> dict:
    """Env-steps/s of both backends on the same scenes under the same random movement actions."""
    from ddppo.sim.environments import make_vector_env
    from ddppo.sim.habitat_backend import HabitatUnavailable, require_habitat_sim

    if rounds < 1 or steps < 1:
        raise ValueError(f"--rounds {rounds} and --steps {steps} must be at least 1")
    try:
        require_habitat_sim()
    except HabitatUnavailable as e:
        raise ValueError(f"bench backends: {e}") from None
    source = Path(data_dir)
    exported = _prepare(source, split)
    common = [f"sim.resolution={resolution}", f"sim.sensors=[{','.join(sensors)}]", "task.generate_if_missing=false",
              f"task.max_episode_steps={episode_steps}"]
    configs = {"embedded": load_config(None, [*common, f"task.data_dir={exported}"]),
               "habitat": load_config(None, [*common, f"task.data_dir={exported}", f"task.scenes_dir={exported}",
                                             "sim.backend=habitat"])}
    g = torch.Generator().manual_seed(seed)
    actions = [torch.randint(1, 4, (num_envs,), generator=g) for _ in range(warmup + steps)]
    envs = {name: make_vector_env(cfg, split, num_envs, seed=seed) for name, cfg in configs.items()}
    try:
        rates: dict[str, list[float]] = {name: [] for name in envs}
        for r in range(rounds):
            for name in (list(envs) if r % 2 == 0 else list(reversed(envs))):
                envs[name].reset()
                _rate(envs[name], actions[:warmup])
                rates[name].append(_rate(envs[name], actions[warmup:]))
        scene_loads = getattr(envs["habitat"], "scene_loads", None)
    finally:
        for env in envs.values():
            env.close()
    fps = {name: statistics.median(v) for name, v in rates.items()}
    return {"bench": "backends", "env_steps_per_s_embedded": fps["embedded"],
            "env_steps_per_s_habitat": fps["habitat"], "embedded_over_habitat": fps["embedded"] / fps["habitat"],
            "rounds_embedded": rates["embedded"], "rounds_habitat": rates["habitat"], "num_envs": num_envs,
            "resolution": resolution, "sensors": list(sensors), "steps_timed": steps, "rounds": rounds,
            "habitat_scene_loads": scene_loads, "dataset": str(exported), "split": split,
            "habitat_sim": _habitat_version(), **peak_memory(), "machine": machine()}


def _habitat_version() -> str:
    import habitat_sim

    return str(habitat_sim.__version__)
