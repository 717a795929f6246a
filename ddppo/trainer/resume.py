"""A run's resume state: what each rank needs to continue exactly where it stopped.

Each rank writes its own file (RNG, environment iterators, recurrent state) tagged with the update, then rank 0
writes the shared model and optimiser (``resume.pt``), which name that update. Every write is atomic, so a crash
at any point leaves a complete set usable.

Two complete sets are kept: ``resume.pt`` and ``resume.prev.pt`` (the set before it, a hard link to the file that
was ``resume.pt``), each with its ``resume_rank{r}.u{update}.pt`` files. A newest set that does not load (a
truncated copy, a bad disk block, a foreign file) is reported with a one-line warning naming the file, and the run
falls back to the previous one; every rank takes the same set."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ddppo.distributed import all_reduce_sum
from ddppo.io import checkpoint
from ddppo.io.atomic import atomic_open

SHARED = "resume.pt"
PREVIOUS = "resume.prev.pt"

# What this process knows to be good, per run directory: file name -> (update, file signature). Rank 0 only links
# a file to resume.prev.pt if it saved or loaded that very file (same inode, size and mtime); a newer resume.pt
# that it could not use is never promoted to "the previous good state".
_known_good: dict[str, dict[str, tuple[int, tuple]]] = {}


def _warn(msg: str) -> None:
    print(f"ddppo: warning: {msg}", file=sys.stderr, flush=True)


def _signature(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _need(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise ValueError(f"resume state {path}: {what} (not a ddppo resume state, or damaged)")


def _check_shared(shared: dict, path: Path) -> None:
    for key in ("policy", "optimizer", "scheduler", "state"):
        _need(isinstance(shared.get(key), dict), path, f"missing field '{key}'")
    st = shared["state"]
    for key in ("update", "env_steps"):
        _need(isinstance(st.get(key), int) and st[key] >= 0, path, f"field 'state.{key}' is not a count")


def _check_rank(mine: dict, path: Path, update: int) -> None:
    for key in ("torch_rng", "hidden", "masks", "prev_actions"):
        _need(isinstance(mine.get(key), torch.Tensor), path, f"missing tensor '{key}'")
    _need(isinstance(mine.get("envs"), dict), path, "missing field 'envs'")
    _need(mine.get("update") == update, path, f"field 'update' is {mine.get('update')!r}, not {update}")


def _try_load(run_dir: Path, name: str, info) -> tuple[dict, dict] | None:
    """(shared, this rank's state) of one set, or None (with a warning naming the bad file)."""
    path = run_dir / name
    if not path.is_file():
        return None
    try:
        shared = checkpoint.load(path)
        _check_shared(shared, path)
    except (ValueError, FileNotFoundError) as e:
        _warn(str(e))
        return None
    saved_world = shared["state"].get("world_size", 1)
    if saved_world != info.world_size:  # a user error, not damage: no fallback to an older state
        raise ValueError(f"resume state {path} was saved by {saved_world} workers, not {info.world_size}; "
                         "resume with the same number of workers or start over with --fresh")
    mine_path = rank_state_path(run_dir, info.rank, shared["state"]["update"])
    try:
        mine = checkpoint.load(mine_path)
        _check_rank(mine, mine_path, shared["state"]["update"])
    except (ValueError, FileNotFoundError) as e:
        _warn(f"{e} (rank state of {path})")
        return None
    return shared, mine


def load_resume(run_dir: Path, info) -> tuple[dict, dict]:
    """The shared state and this rank's state of the newest complete set in ``run_dir`` that every rank can
    load: resume.pt, else resume.prev.pt. A one-line ValueError naming the files when neither loads."""
    run_dir = Path(run_dir)
    for name in (SHARED, PREVIOUS):
        got = _try_load(run_dir, name, info)
        # every rank must continue from the same update: take a set only if all ranks could load it
        if int(all_reduce_sum([float(got is not None)], info)[0]) == info.world_size:
            shared, mine = got
            if name == PREVIOUS:
                _warn(f"resuming from the previous resume state {run_dir / name} "
                      f"(update {shared['state']['update']})")
            _known_good[str(run_dir.resolve())] = {name: (shared["state"]["update"], _signature(run_dir / name))}
            return shared, mine
    raise ValueError(f"resume state in {run_dir}: neither {SHARED} nor {PREVIOUS} (with every rank's "
                     "resume_rank*.pt) loads; see the warnings above, or start over with --fresh")


def restore_resume(run_dir: Path, info, policy, optimizer, scheduler, envs, storage) -> tuple[dict, dict]:
    """Put back what :func:`save_resume` saved, from the newest set that loads (:func:`load_resume`): the model,
    optimiser and scheduler, this rank's RNG, environments (mid-episode) and the storage's first step. Returns the
    saved counters and this rank's file, whose records the trainer's own objects read back."""
    shared, mine = load_resume(run_dir, info)
    policy.load_state_dict(shared["policy"])
    optimizer.load_state_dict(shared["optimizer"])
    scheduler.load_state_dict(shared["scheduler"])
    torch.set_rng_state(mine["torch_rng"])
    envs.load_state_dict(mine["envs"])
    first_obs = policy.preprocess({k: v.to(info.device) for k, v in envs.observe().items()})
    storage.set_first_observation(first_obs, mine["hidden"].to(info.device), mine["masks"].to(info.device))
    storage.prev_actions[0].copy_(mine["prev_actions"])
    return shared["state"], mine


def set_aside_previous_run(run_dir: Path, log) -> None:
    """--fresh: the old resume state goes (so a crash before the first save cannot resume it); the old
    checkpoints and TensorBoard logs move to a dated folder instead of mixing with the new run's."""
    for old in [run_dir / SHARED, run_dir / PREVIOUS, *run_dir.glob("resume_rank*.pt")]:
        old.unlink(missing_ok=True)
    _known_good.pop(str(Path(run_dir).resolve()), None)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("checkpoints", "tb"):
        if (run_dir / name).exists():
            target = run_dir / f"previous-{stamp}" / name
            target.parent.mkdir(exist_ok=True)
            (run_dir / name).rename(target)
            log(f"--fresh: moved the previous {name}/ to {target}")


def rank_state_path(run_dir: Path, rank: int, update: int) -> Path:
    return run_dir / f"resume_rank{rank}.u{update:07d}.pt"


def _sweep_temporaries(directory: Path, prefix: str) -> None:
    """Temporary files a killed writer (kill -9, power loss) left behind; only the caller's own file names."""
    for tmp in directory.glob(f".{prefix}*.tmp"):
        tmp.unlink(missing_ok=True)


def save_resume(run_dir, info, policy, optimizer, scheduler, state: dict, envs, storage, cfg, records: dict) -> None:
    """Each rank's state, then the shared state (see the module's docstring). ``state`` holds the run's counters
    (``update`` and ``env_steps`` among them), ``records`` the rank's own to save beside its RNG and environments."""
    run_dir = Path(run_dir)
    update = state["update"]
    _sweep_temporaries(run_dir, f"resume_rank{info.rank}.")
    checkpoint.save({"torch_rng": torch.get_rng_state(), "envs": envs.state_dict(),
                     "hidden": storage.hidden[0].cpu(), "masks": storage.masks[0].cpu(),
                     "prev_actions": storage.prev_actions[0].cpu(), "update": update, **records},
                    rank_state_path(run_dir, info.rank, update))
    if info.enabled:
        dist.barrier()  # every rank's file of this update exists before resume.pt names the update
    previous = -1
    if info.is_main:
        previous = _keep_previous(run_dir, update)
        write_shared_state(run_dir, policy, optimizer, scheduler, state, cfg)
        _known_good[str(run_dir.resolve())] = {
            SHARED: (update, _signature(run_dir / SHARED)),
            **({PREVIOUS: (previous, _signature(run_dir / PREVIOUS))} if previous >= 0 else {}),
        }
    # rank 0 tells everyone which previous update survives (and, being a collective, nobody exits, and gets its
    # job step torn down, before rank 0 has written)
    previous = int(all_reduce_sum([float(previous + 1)], info)[0]) - 1
    keep = {rank_state_path(run_dir, info.rank, u) for u in (update, previous) if u >= 0}
    for old in run_dir.glob(f"resume_rank{info.rank}.u*.pt"):
        if old not in keep:
            old.unlink(missing_ok=True)


def _keep_previous(run_dir: Path, update: int) -> int:
    """Before resume.pt is replaced: make the last known-good set resume.prev.pt. Returns its update, or -1."""
    _sweep_temporaries(run_dir, SHARED + ".")
    _sweep_temporaries(run_dir, PREVIOUS + ".")
    known = _known_good.get(str(run_dir.resolve()), {})
    current, prev = run_dir / SHARED, run_dir / PREVIOUS
    if SHARED in known and known[SHARED][1] == _signature(current) and known[SHARED][0] != update:
        tmp = run_dir / f".{PREVIOUS}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(current, tmp)  # no copy: the same inode under a second name, renamed atomically into place
            os.replace(tmp, prev)
        except OSError:  # file systems without hard links
            tmp.unlink(missing_ok=True)
            with atomic_open(prev) as f, current.open("rb") as src:
                shutil.copyfileobj(src, f)
        return known[SHARED][0]
    if PREVIOUS in known and known[PREVIOUS][1] == _signature(prev) and known[PREVIOUS][0] != update:
        return known[PREVIOUS][0]
    # nothing this process can vouch for (a fresh run, or a newest set it could not load): no stale fallback
    prev.unlink(missing_ok=True)
    return -1


def write_shared_state(run_dir, policy, optimizer, scheduler, state, cfg) -> None:
    weights = {k: v.cpu() for k, v in policy.state_dict().items()}
    checkpoint.save({"policy": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "state": dict(state)}, run_dir / SHARED)
    ckpt_dir = run_dir / "checkpoints"
    _sweep_temporaries(ckpt_dir, "ckpt_")
    checkpoint.save({"policy": weights, "config": OmegaConf.to_container(cfg, enum_to_str=True),
                     "env_steps": state["env_steps"], "update": state["update"]},
                    ckpt_dir / f"ckpt_{state['update']:06d}.pt")
    checkpoint.prune(ckpt_dir, cfg.keep_checkpoints)
