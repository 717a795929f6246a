"""A run's resume state: what each rank needs to continue exactly where it stopped.

Each rank writes its own file (RNG, environment iterators, recurrent state) tagged with the update, then rank 0
writes the shared model and optimiser, which name that update. Every write is atomic, so a crash at any point
leaves the previous complete set usable."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ddppo import checkpoint


def load_resume(run_dir: Path, info) -> tuple[dict, dict]:
    """The shared state and this rank's state of the last complete save in ``run_dir``."""
    resume_path = run_dir / "resume.pt"
    shared = checkpoint.load(resume_path)
    saved_world = shared["state"].get("world_size", 1)
    if saved_world != info.world_size:
        raise ValueError(f"resume state {resume_path} was saved by {saved_world} workers, not {info.world_size}; "
                         "resume with the same number of workers or start over with --fresh")
    mine = checkpoint.load(rank_state_path(run_dir, info.rank, shared["state"]["update"]))
    return shared, mine


def set_aside_previous_run(run_dir: Path, log) -> None:
    """--fresh: the old resume state goes (so a crash before the first save cannot resume it); the old
    checkpoints and TensorBoard logs move to a dated folder instead of mixing with the new run's."""
    for old in [run_dir / "resume.pt", *run_dir.glob("resume_rank*.pt")]:
        old.unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("checkpoints", "tb"):
        if (run_dir / name).exists():
            target = run_dir / f"previous-{stamp}" / name
            target.parent.mkdir(exist_ok=True)
            (run_dir / name).rename(target)
            log(f"--fresh: moved the previous {name}/ to {target}")


def rank_state_path(run_dir: Path, rank: int, update: int) -> Path:
    return run_dir / f"resume_rank{rank}.u{update:07d}.pt"


def save_resume(run_dir, info, policy, optimizer, scheduler, state, envs, storage, cfg, counters: dict) -> None:
    """Each rank's state, then the shared state (see the module's docstring)."""
    update = state["update"]
    checkpoint.save({"torch_rng": torch.get_rng_state(), "envs": envs.state_dict(),
                     "hidden": storage.hidden[0].cpu(), "masks": storage.masks[0].cpu(),
                     "prev_actions": storage.prev_actions[0].cpu(), "update": update, **counters},
                    rank_state_path(run_dir, info.rank, update))
    if info.enabled:
        dist.barrier()
    if info.is_main:
        write_shared_state(run_dir, policy, optimizer, scheduler, state, cfg)
    if info.enabled:
        dist.barrier()  # nobody exits (and gets its job step torn down) before rank 0 has written
    for old in run_dir.glob(f"resume_rank{info.rank}.u*.pt"):
        if old != rank_state_path(run_dir, info.rank, update):
            old.unlink(missing_ok=True)


def write_shared_state(run_dir, policy, optimizer, scheduler, state, cfg) -> None:
    weights = {k: v.cpu() for k, v in policy.state_dict().items()}
    checkpoint.save({"policy": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "state": dict(state)}, run_dir / "resume.pt")
    ckpt_dir = run_dir / "checkpoints"
    checkpoint.save({"policy": weights, "config": OmegaConf.to_container(cfg), "env_steps": state["env_steps"],
                     "update": state["update"]}, ckpt_dir / f"ckpt_{state['update']:06d}.pt")
    checkpoint.prune(ckpt_dir, cfg.keep_checkpoints)
