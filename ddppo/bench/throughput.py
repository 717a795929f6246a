"""``ddppo bench sim``: simulator throughput, printed as JSON (and appended to bench/LOG.md on request)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

from ddppo.config import DatasetConfig, SimConfig, TaskConfig, TrainConfig
from ddppo.sim.dataset_dir import ensure_dataset, load_split
from ddppo.sim.vector_env import PointNavVectorEnv
from ddppo.trainer.malloc_settings import keep_freed_memory
from ddppo.trainer.peak_memory import peak_memory


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, cores (usable by this process / in the machine), torch threads and version, Python, and the
    GPU when CUDA is available: what a benchmark figure depends on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    desc = (f"{cpu_model()}, {usable}/{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}")
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return desc


def record(result: dict, command: str, path: str | os.PathLike) -> None:
    """Append ``result`` to the results file (bench/LOG.md, the benchmarks' history) as a dated entry with the exact
    command line and the machine, so every figure can be traced to a run and rerun; bench/RESULTS.md holds the
    current figure of each benchmark, taken from those entries."""
    from datetime import datetime, timezone
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = (f"\n### `{command}`, {when}\n\nMachine: {result.get('machine') or machine()}\n\n"
             f"```json\n{json.dumps(result, indent=1)}\n```\n")
    with open(path, "a") as f:
        f.write(entry)


def bench_sim(num_envs: int = 64, resolution: int = 64, sensors=("depth",), device: str = "cpu", steps: int = 300,
              data_dir: str = "data/pointnav", split: str = "train", seed: int = 0, warmup: int = 300,
              episode_steps: int = 100, stop: bool = False) -> dict:
    """Env-steps/s of the batched simulator under random actions.

    By default the actions are the three movements and episodes end after ``episode_steps`` steps, the length of
    a trained agent's episodes; ``stop=True`` draws STOP too (episodes then last ~4 steps: a reset benchmark).
    A warm-up of ``warmup`` steps first compiles the kernels and fills the geodesic cache as a long run would;
    the timed window reports its own reset share and cache hit rate."""
    task = TaskConfig(data_dir=data_dir, split=split, max_episode_steps=episode_steps)
    ensure_dataset(task, DatasetConfig(), log=lambda *_: None)
    episodes, navs = load_split(data_dir, split)
    sim = SimConfig(resolution=resolution, sensors=list(sensors), device=device)
    env = PointNavVectorEnv(episodes, navs, num_envs, sim, task, seed=seed, device=device)
    env.reset()
    g = torch.Generator().manual_seed(seed)
    low = 0 if stop else 1
    for _ in range(warmup):
        env.step(torch.randint(low, 4, (num_envs,), generator=g))
    actions = [torch.randint(low, 4, (num_envs,), generator=g) for _ in range(steps)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    hits0, misses0, reset_s0 = env.cache.hits, env.cache.misses, env.reset_seconds
    t0 = time.perf_counter()
    resets = 0
    for a in actions:
        resets += int(env.step(a).done.sum())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    hits, misses = env.cache.hits - hits0, env.cache.misses - misses0
    return {
        "bench": "sim",
        "env_steps_per_s": num_envs * steps / dt,
        "batch": num_envs,
        "resolution": resolution,
        "sensors": list(sensors),
        "device": device,
        "actions": "all" if stop else "movement",
        "episode_steps": episode_steps,
        "episodes_ended": resets,
        "reset_time_fraction": (env.reset_seconds - reset_s0) / dt,
        "geodesic_cache_hit_rate": hits / max(1, hits + misses),
        **peak_memory(),
        "machine": machine(),
    }


def print_json(result: dict) -> None:
    print(json.dumps(result, indent=None))


def bench_train(overrides: list[str], updates: int = 10, config_file: str | None = None) -> dict:
    """End-to-end training env-steps/s against the serial limit 1 / (t_sim + t_act + t_learn), each term per
    env-step and measured alone, in the same process, with the same config."""
    import tempfile

    from omegaconf import OmegaConf

    from ddppo.config import load_config
    from ddppo.distributed import resolve_device, resolve_sim_device
    from ddppo.trainer.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config_file, [*overrides, f"run_dir={tmp}", "eval_episodes=0", "log_interval=1",
                                        "checkpoint_interval=1000000"])
        n, T = cfg.ppo.num_envs, cfg.ppo.num_steps
        ensure_dataset(cfg.task, cfg.dataset, log=lambda *_: None)
        if cfg.keep_freed_memory:  # the terms are timed as the trainer runs them
            keep_freed_memory()
        # each term on the devices the trainer uses (see train() and init_distributed)
        device = resolve_device(cfg.device)
        sim_device = resolve_sim_device(cfg.sim.device, device)
        t_sim, t_act, t_learn = _serial_terms(cfg, device, sim_device)
        limit = 1.0 / ((t_sim + t_act + t_learn) / (T * n))
        # end to end: the real trainer, timed over its updates after the first (start-up excluded)
        cfg.total_steps = T * n * (updates + 1)
        result = train(OmegaConf.create(OmegaConf.to_container(cfg)), fresh=True, log=lambda *_: None,
                       show_progress=False)
        if len(result["progress"]) < 2:  # nothing to time after the first update: say what the run did instead
            raise RuntimeError(f"bench train: the run recorded {len(result['progress'])} update(s) of the "
                               f"{updates + 1} asked for (env_steps {result['env_steps']}, signal {result['signal']})")
        (t_first, s_first), (t_last, s_last) = result["progress"][0], result["progress"][-1]
        end_to_end = (s_last - s_first) / (t_last - t_first)
    return {
        "bench": "train",
        "env_steps_per_s": end_to_end,
        "serial_limit_env_steps_per_s": limit,
        "ratio_to_serial_limit": end_to_end / limit,
        "t_sim_us_per_step": 1e6 * t_sim / (T * n),
        "t_act_us_per_step": 1e6 * t_act / (T * n),
        "t_learn_us_per_step": 1e6 * t_learn / (T * n),
        "num_envs": n,
        "num_steps": T,
        "updates_timed": updates,
        "device": str(device),
        "sim_device": str(sim_device),
        **peak_memory(),
        "config": config_file,
        "overrides": overrides,
        "machine": machine(),
    }


def _serial_terms(cfg: TrainConfig, device: torch.device, sim_device: torch.device) -> tuple[float, float, float]:
    """Seconds of one rollout's simulator steps and actions, and of one PPO update on it, each timed alone:
    (t_sim, t_act, t_learn)."""
    from ddppo.distributed import DistInfo
    from ddppo.evaluation.episodes import PolicyAgent, agent_steps
    from ddppo.policy import Policy
    from ddppo.rl.flat_grads import FlatGradients
    from ddppo.rl.ppo import make_adam
    from ddppo.rl.storage import RolloutStorage
    from ddppo.sim.environments import make_vector_env
    from ddppo.trainer.update import ppo_update

    n, T = cfg.ppo.num_envs, cfg.ppo.num_steps
    clock = _device_clock(device, sim_device)
    env = make_vector_env(cfg, cfg.task.split, n, seed=cfg.seed, device=sim_device)
    policy = Policy(env.obs_spaces, cfg.policy).to(device)
    first_obs = env.reset()
    storage = RolloutStorage(T, n, policy.storage_spaces(env.obs_spaces),
                             (policy.num_hidden_layers, cfg.policy.hidden_size), device)
    storage.set_first_observation(policy.preprocess({k: v.to(device) for k, v in first_obs.items()}))
    g = torch.Generator().manual_seed(0)
    policy.eval()
    for _ in range(T):  # warm-up (kernels compiled, geodesic cache filled)
        env.step(torch.randint(0, 4, (n,), generator=g).to(sim_device))
    # a realistic rollout to learn on, the policy sampling as in training (its preprocessing is part of acting)
    agent = PolicyAgent(policy, n, device, deterministic=False, actions_device=sim_device)
    t_sim = t_act = 0.0
    waiting = None  # a step's record, stored with the observation after it once the agent has pooled that to act
    for actions, r, act_s, step_s in agent_steps(env, agent, env.observe(), max_steps=T, clock=clock):
        t_act += act_s
        t_sim += step_s
        if waiting is not None:
            storage.insert(agent.obs, *waiting)
        masks = (~r.done).to(device).float()
        waiting = (agent.hidden, actions.to(device), agent.log_probs, agent.values, r.reward.to(device), masks, masks)
    storage.insert(policy.preprocess({k: v.to(device) for k, v in r.obs.items()}), *waiting)
    storage.compute_returns(torch.zeros(n, device=device), cfg.ppo.gamma, cfg.ppo.tau)
    policy.train()
    optimizer = make_adam(policy.parameters(), lr=cfg.ppo.lr, eps=cfg.ppo.eps)
    grads = FlatGradients(policy.parameters())
    ppo_update(policy, optimizer, grads, storage, cfg.ppo, DistInfo(device=device))  # warm-up
    tl = clock()
    ppo_update(policy, optimizer, grads, storage, cfg.ppo, DistInfo(device=device))
    return t_sim, t_act, clock() - tl


def _device_clock(*devices: torch.device):
    """perf_counter after waiting for the CUDA devices among ``devices``: their kernels run asynchronously."""
    cuda = [d for d in devices if d.type == "cuda"]

    def clock() -> float:
        for d in cuda:
            torch.cuda.synchronize(d)
        return time.perf_counter()

    return clock


def bench_scaling(overrides: list[str], updates: int = 12, config_file: str | None = None,
                  port: int = 29611, repeats: int = 1) -> dict:
    """1 vs 2 Gloo ranks (torchrun, one thread each), and 2 ranks with rank 1's environments made 2x slower,
    with and without straggler preemption. With 2 ranks, preemption needs sync_frac <= 0.5 (one finished
    worker out of two), which the preemption runs use.

    The four runs go one after another, so a shared machine's drift moves a single ratio as much as preemption
    does. ``repeats`` > 1 runs all four that many rounds, the order reversed every other round, and reports each
    rate and ratio as the median over the rounds (``rounds`` lists every round's figures)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from ddppo.config import load_config

    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(config_file, overrides)
        per_update = base.ppo.num_steps * base.ppo.num_envs

        def run(name: str, ranks: int, extra: list[str]) -> dict:
            total = per_update * ranks * (updates + 1)
            args = [*overrides, f"run_dir={tmp}", f"name={name}", f"total_steps={total}", "eval_episodes=0",
                    "log_interval=1000", "checkpoint_interval=1000000", *extra]
            cfg_args = ["--config", config_file] if config_file else []
            script = Path(__file__).resolve().parents[1] / "train.py"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                   f"--master-port={port}", str(script), *cfg_args, "--fresh", *args]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            return json.loads((Path(tmp) / name / "summary.json").read_text())

        # the slow rank sleeps, after every step, as long as its simulator took alone: its environments are 2x
        # slower (measured once, so that every round has the same straggler)
        single = run("one", 1, [])
        slowdown = single["sim_s_per_step"]
        slow = [f"ddppo.slowdown={slowdown}", "ddppo.slow_rank=1", "ddppo.sync_frac=0.5"]
        settings = {"one": (1, []), "two": (2, []), "slow_off": (2, [*slow, "ddppo.preemption=false"]),
                    "slow_on": (2, [*slow, "ddppo.preemption=true"])}
        orders = [list(settings) if r % 2 == 0 else list(reversed(settings)) for r in range(repeats)]
        summaries = [{name: single if (r, name) == (0, "one") else run(name, *settings[name]) for name in order}
                     for r, order in enumerate(orders)]
    rounds = [{"fps_1_rank": s["one"]["steady_fps"], "fps_2_ranks": s["two"]["steady_fps"],
               "scaling_efficiency": s["two"]["steady_fps"] / (2 * s["one"]["steady_fps"]),
               "fps_2_ranks_straggler_no_preemption": s["slow_off"]["steady_fps"],
               "fps_2_ranks_straggler_preemption": s["slow_on"]["steady_fps"],
               "preemption_speedup": s["slow_on"]["steady_fps"] / s["slow_off"]["steady_fps"],
               # the share of its rollout each rank collected, averaged over ranks and updates (1: nobody was cut)
               "mean_rollout_fraction_no_preemption": s["slow_off"]["ddppo/rollout_fraction"],
               "mean_rollout_fraction_preemption": s["slow_on"]["ddppo/rollout_fraction"]} for s in summaries]
    out: dict = {"bench": "scaling", **{k: statistics.median(rd[k] for rd in rounds) for k in rounds[0]},
                 "straggler_sleep_s_per_step": slowdown, "updates_timed": updates, "repeats": repeats}
    if repeats > 1:
        out.update(round_orders=orders, rounds=rounds)
    # each rank's own peak memory and thread budget in the first round (see ddppo/trainer/loop.py)
    for key in ("peak_rss_mib", "cuda_max_allocated_mib", "torch_threads", "render_threads"):
        if f"{key}_per_rank" in single:
            out[f"{key}_per_rank"] = {name: summaries[0][name][f"{key}_per_rank"] for name in settings}
    out.update(config=config_file, overrides=overrides, machine=machine())
    return out
