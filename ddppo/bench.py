"""``ddppo bench sim``: simulator throughput, printed as JSON (and appended to bench/RESULTS.md on request)."""

from __future__ import annotations

import json
import platform
import time

import torch

from ddppo.config import DatasetConfig, SimConfig, TaskConfig
from ddppo.sim.data import ensure_dataset, load_split
from ddppo.sim.vector_env import PointNavVectorEnv


def machine() -> str:
    return f"{platform.machine()} {torch.get_num_threads()} threads, {platform.processor() or platform.system()}"


def bench_sim(num_envs: int = 64, resolution: int = 64, sensors=("depth",), device: str = "cpu", steps: int = 300,
              data_dir: str = "data/pointnav", split: str = "train", seed: int = 0) -> dict:
    """Env-steps/s of the batched simulator under uniformly random actions (STOP included, so resets count)."""
    task = TaskConfig(data_dir=data_dir, split=split)
    ensure_dataset(task, DatasetConfig(), log=lambda *_: None)
    episodes, navs = load_split(data_dir, split)
    sim = SimConfig(resolution=resolution, sensors=list(sensors), device=device)
    env = PointNavVectorEnv(episodes, navs, num_envs, sim, task, seed=seed, device=device)
    env.reset()
    g = torch.Generator().manual_seed(seed)
    actions = [torch.randint(0, 4, (num_envs,), generator=g) for _ in range(steps)]
    # warm-up: compile kernels and fill the geodesic cache as a long run would have
    for a in actions[: min(50, steps)]:
        env.step(a)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    resets = 0
    for a in actions:
        resets += int(env.step(a).done.sum())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "bench": "sim",
        "env_steps_per_s": num_envs * steps / dt,
        "batch": num_envs,
        "resolution": resolution,
        "sensors": list(sensors),
        "device": device,
        "episodes_ended": resets,
        "geodesic_cache_hit_rate": env.cache.hits / max(1, env.cache.hits + env.cache.misses),
        "machine": machine(),
    }


def print_json(result: dict) -> None:
    print(json.dumps(result, indent=None))
