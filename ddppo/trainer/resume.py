"""A run's resume state: what each rank needs to continue exactly where it stopped.

The state is a set of named components, each saving itself (``state_dict``/``load_state_dict``): the shared ones
(policy, optimiser, learning-rate schedule, and ``state``, the run's counters) and each rank's own (torch's RNG, the
environments with their episode iterators, the rollout storage's live steps, the episode-metric and straggler
windows). Each rank writes its own file tagged with the update, then rank 0 writes the shared file (``resume.pt``),
which names that update. Every write is atomic, so a crash at any point leaves a complete set usable. Files of an
earlier layout (``resume_format`` 1, written before components saved themselves) are refused in one line.

Two complete sets are kept: ``resume.pt`` and ``resume.prev.pt`` (the set before it, a hard link to the file that
was ``resume.pt``), each with its ``resume_rank{r}.u{update}.pt`` files. A newest set that does not load (a
truncated copy, a bad disk block, a foreign file) is reported with a one-line warning naming the file, and the run
falls back to the previous one; every rank takes the same set."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import ddppo
from ddppo.distributed import all_reduce_sum
from ddppo.io import checkpoint
from ddppo.io.atomic import atomic_open

SHARED = "resume.pt"
PREVIOUS = "resume.prev.pt"
RESUME_FORMAT = 2
"""The layout of the resume files: 2 = one entry per named component. (1, before 2026-12-08: fixed fields.)"""


class Component(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class TorchRNG:
    """torch's global RNG (it samples the actions) as a component of each rank's resume state."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["state"])

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


def _check_format(saved: dict, path: Path) -> None:
    """A file of another resume layout is not damage, so no fallback to an older set: one line saying so."""
    written = saved.get("resume_format", 1)
    if written != RESUME_FORMAT:
        by = saved.get("ddppo_version", "0.1.0 before 2026-12-08")
        raise ValueError(f"resume state {path} has resume format {written} (written by ddppo {by}); this ddppo "
                         f"({ddppo.__version__}) reads format {RESUME_FORMAT}: finish that run with the ddppo that "
                         "wrote it, or start over with --fresh")


def _check_components(saved: dict, names, path: Path) -> None:
    for key in names:
        _need(isinstance(saved.get(key), dict), path, f"missing component '{key}'")


def _check_shared(shared: dict, names, path: Path) -> None:
    _check_components(shared, names, path)
    st = shared["state"]
    for key in ("update", "env_steps"):
        _need(isinstance(st.get(key), int) and st[key] >= 0, path, f"field 'state.{key}' is not a count")


def _check_rank(mine: dict, names, path: Path, update: int) -> None:
    _check_components(mine, names, path)
    _need(mine.get("update") == update, path, f"field 'update' is {mine.get('update')!r}, not {update}")


def _try_load(run_dir: Path, name: str, info, shared_names, rank_names) -> tuple[dict, dict] | None:
    """(shared, this rank's state) of one set, or None (with a warning naming the bad file)."""
    path = run_dir / name
    if not path.is_file():
        return None
    try:
        shared = checkpoint.load(path)
    except (ValueError, FileNotFoundError) as e:
        _warn(str(e))
        return None
    if isinstance(shared, dict):
        _check_format(shared, path)
    try:
        _check_shared(shared, shared_names, path)
    except ValueError as e:
        _warn(str(e))
        return None
    saved_world = shared["state"].get("world_size", 1)
    if saved_world != info.world_size:  # a user error, not damage: no fallback to an older state
        raise ValueError(f"resume state {path} was saved by {saved_world} workers, not {info.world_size}; "
                         "resume with the same number of workers or start over with --fresh")
    mine_path = rank_state_path(run_dir, info.rank, shared["state"]["update"])
    try:
        mine = checkpoint.load(mine_path)
        _check_rank(mine, rank_names, mine_path, shared["state"]["update"])
    except (ValueError, FileNotFoundError) as e:
        _warn(f"{e} (rank state of {path})")
        return None
    return shared, mine


def load_resume(run_dir: Path, info, shared_names=(), rank_names=()) -> tuple[dict, dict]:
    """The shared state and this rank's state of the newest complete set in ``run_dir`` that every rank can
    load (each holding the components named): resume.pt, else resume.prev.pt. A one-line ValueError naming the
    files when neither loads."""
    run_dir = Path(run_dir)
    for name in (SHARED, PREVIOUS):
        got = _try_load(run_dir, name, info, tuple(shared_names), tuple(rank_names))
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


def restore_resume(run_dir: Path, info, shared: Mapping[str, Component], mine: Mapping[str, Component]) -> None:
    """Put back what :func:`save_resume` saved into the same named components, from the newest set that loads
    (:func:`load_resume`), shared components first."""
    saved_shared, saved_mine = load_resume(run_dir, info, shared, mine)
    for components, saved in ((shared, saved_shared), (mine, saved_mine)):
        for name, component in components.items():
            component.load_state_dict(saved[name])


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


def _states(components: Mapping[str, Component]) -> dict[str, Any]:
    return {"resume_format": RESUME_FORMAT, "ddppo_version": ddppo.__version__,
            **{name: _on_cpu(component.state_dict()) for name, component in components.items()}}


def _on_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_cpu(v) for v in state)
    return state


def save_resume(run_dir, info, shared: Mapping[str, Component], mine: Mapping[str, Component], cfg) -> None:
    """This rank's components, then (rank 0) the shared ones and a checkpoint (see the module's docstring).
    ``shared["state"]`` holds the run's counters: ``update`` and ``env_steps`` name the set."""
    run_dir = Path(run_dir)
    state = shared["state"].state_dict()
    update = state["update"]
    _sweep_temporaries(run_dir, f"resume_rank{info.rank}.")
    checkpoint.save({**_states(mine), "update": update}, rank_state_path(run_dir, info.rank, update))
    if info.enabled:
        dist.barrier()  # every rank's file of this update exists before resume.pt names the update
    previous = -1
    if info.is_main:
        previous = _keep_previous(run_dir, update)
        write_shared_state(run_dir, shared, cfg)
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


def write_shared_state(run_dir, shared: Mapping[str, Component], cfg) -> None:
    states = _states(shared)
    checkpoint.save(states, run_dir / SHARED)
    weights, state = states["policy"], states["state"]
    ckpt_dir = run_dir / "checkpoints"
    _sweep_temporaries(ckpt_dir, "ckpt_")
    checkpoint.save({"policy": weights, "config": OmegaConf.to_container(cfg, enum_to_str=True),
                     "env_steps": state["env_steps"], "update": state["update"]},
                    ckpt_dir / f"ckpt_{state['update']:06d}.pt")
    checkpoint.prune(ckpt_dir, cfg.keep_checkpoints)
