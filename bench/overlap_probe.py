"""Would overlapping simulation with inference pay on this machine? Rollout-only env-steps/s, printed as JSON.

    python bench/overlap_probe.py [--steps 200] [--threads 2] [key=value ...]

Two ways to collect the same rollout with the config's policy (untrained) and environments:
- ``sequential``: one batched environment of ``ppo.num_envs``; act on all, then step all (what ddppo's trainer does);
- ``overlapped``: two halves (environment streams 0..N/2-1 and N/2..N-1, so the same episodes), double-buffered: one
  half is stepped in a worker thread while the policy acts on the other (the simulator's numba kernels release the
  GIL with ``--nogil``, recompiled in this process only);
- ``overlapped_process``: the same two halves stepped in a worker process (no GIL shared at all; observations come
  back through a pipe), while this process acts on the other half.
Alternated ``--repeats`` times; ``overlap_speedup`` = overlapped ÷ sequential and ``process_overlap_speedup`` =
overlapped_process ÷ sequential, best of each. No learning: this measures only the part of a step that overlapping
could hide.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddppo.bench.throughput import machine  # noqa: E402
from ddppo.config import load_config  # noqa: E402
from ddppo.policy import Policy  # noqa: E402
from ddppo.sim.dataset_dir import ensure_dataset  # noqa: E402
from ddppo.sim.environments import make_vector_env  # noqa: E402
from ddppo.sim.kernels.numba_kernels import set_render_threads  # noqa: E402


def step_kernels() -> list[tuple[object, str]]:
    """(module, name) of every compiled kernel an environment step runs."""
    from ddppo.sim.kernels import numba_kernels

    return [(numba_kernels, name) for name in ("_render_numba", "_step_numba", "_geodesic_numba", "_pose_sensors_numba",
                                               "_tally_numba", "_pointnav_step_numba")]


def release_gil() -> None:
    """Recompile the simulator's kernels with nogil=True (this process only; the cached builds stay as they are)."""
    for module, name in step_kernels():
        kernel = getattr(module, name)
        options = {**kernel.targetoptions, "nogil": True}
        options.pop("nopython", None)  # implied by njit
        setattr(module, name, numba.njit(**options)(kernel.py_func))


class Half:
    """One environment batch (``env``, or stepped elsewhere when None) with the policy inputs of its next action."""

    def __init__(self, env, policy, first_obs=None):
        self.env, self.policy = env, policy
        first_obs = env.reset() if first_obs is None else first_obs
        n = len(next(iter(first_obs.values())))
        self.obs = policy.preprocess(first_obs)
        self.hidden = policy.initial_hidden(n)
        self.prev = torch.zeros(n, dtype=torch.long)
        self.masks = torch.zeros(n)
        self.pending = None

    def act(self) -> torch.Tensor:
        with torch.no_grad():
            actions, _, _, self.hidden = self.policy.act(self.obs, self.prev, self.masks, self.hidden)
        self.prev = actions
        return actions

    def take(self, result) -> None:
        self.obs = self.policy.preprocess(result.obs)
        self.masks = (~result.done).float()


def sequential(cfg, policy, steps: int) -> float:
    half = Half(make_vector_env(cfg, "train", cfg.ppo.num_envs, seed=cfg.seed, env_offset=0), policy)
    t0 = time.perf_counter()
    for _ in range(steps):
        half.take(half.env.step(half.act()))
    return steps * cfg.ppo.num_envs / (time.perf_counter() - t0)


def overlapped(cfg, policy, steps: int) -> float:
    n = cfg.ppo.num_envs // 2
    halves = [Half(make_vector_env(cfg, "train", n, seed=cfg.seed, env_offset=k * n), policy) for k in (0, 1)]
    with ThreadPoolExecutor(1) as pool:
        t0 = time.perf_counter()
        for _ in range(steps):
            for half in halves:  # while this half acts, the other one's step runs in the worker thread
                if half.pending is not None:
                    half.take(half.pending.result())
                half.pending = pool.submit(half.env.step, half.act())
        for half in halves:
            half.take(half.pending.result())
        return steps * 2 * n / (time.perf_counter() - t0)


def step_halves(conn, cfg, threads: int) -> None:
    """The worker process of ``overlapped_process``: owns both halves, steps the one it is sent actions for."""
    torch.set_num_threads(threads)
    set_render_threads(threads)
    n = cfg.ppo.num_envs // 2
    envs = [make_vector_env(cfg, "train", n, seed=cfg.seed, env_offset=k * n) for k in (0, 1)]
    conn.send([{key: v.numpy() for key, v in env.reset().items()} for env in envs])
    while (message := conn.recv()) is not None:
        k, actions = message
        r = envs[k].step(torch.from_numpy(actions))
        conn.send(({key: v.numpy() for key, v in r.obs.items()}, r.done.numpy()))


def overlapped_process(cfg, policy, steps: int, threads: int) -> float:
    ctx = mp.get_context("spawn")  # a forked child would inherit this process's OpenMP state
    conn, child_conn = ctx.Pipe()
    worker = ctx.Process(target=step_halves, args=(child_conn, cfg, threads), daemon=True)
    worker.start()
    try:
        halves = [Half(None, policy, {key: torch.from_numpy(v) for key, v in obs.items()}) for obs in conn.recv()]

        def take(half):
            obs, done = conn.recv()
            half.take(SimpleNamespace(obs={key: torch.from_numpy(v) for key, v in obs.items()},
                                      done=torch.from_numpy(done)))

        t0 = time.perf_counter()
        for _ in range(steps):
            for k, half in enumerate(halves):  # while this half acts, the worker steps the other one
                if half.pending:
                    take(half)
                conn.send((k, half.act().numpy()))
                half.pending = True
        for half in halves:
            take(half)
        return steps * cfg.ppo.num_envs / (time.perf_counter() - t0)
    finally:
        conn.send(None)
        worker.join(timeout=30)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    p.add_argument("--nogil", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.ppo.num_envs < 2 or cfg.ppo.num_envs % 2:
        raise SystemExit(f"overlap_probe: ppo.num_envs={cfg.ppo.num_envs} must be even")
    torch.set_num_threads(args.threads)
    set_render_threads(args.threads)
    if args.nogil:
        release_gil()
    ensure_dataset(cfg.task, cfg.dataset, log=lambda *_: None)
    torch.manual_seed(cfg.seed)
    env = make_vector_env(cfg, "train", 2, seed=cfg.seed)
    policy = Policy(env.obs_spaces, cfg.policy).eval()
    sequential(cfg, policy, min(args.steps, 20))  # compile the kernels, warm the caches
    runs: dict[str, list[float]] = {"sequential": [], "overlapped": [], "overlapped_process": []}
    for _ in range(args.repeats):
        runs["sequential"].append(sequential(cfg, policy, args.steps))
        runs["overlapped"].append(overlapped(cfg, policy, args.steps))
        runs["overlapped_process"].append(overlapped_process(cfg, policy, args.steps, args.threads))
    out = {"bench": "overlap_probe", **{f"fps_{k}": max(v) for k, v in runs.items()}, "runs": runs,
           "steps": args.steps, "num_envs": cfg.ppo.num_envs, "threads": args.threads, "nogil": args.nogil,
           "machine": machine()}
    out["overlap_speedup"] = out["fps_overlapped"] / out["fps_sequential"]
    out["process_overlap_speedup"] = out["fps_overlapped_process"] / out["fps_sequential"]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
