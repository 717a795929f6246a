"""Checkpoints and resume state: plain tensors and Python values only, so ``torch.load(weights_only=True)`` reads
them and loading never runs code. Every file is written atomically.

``load`` is the one loader of every checkpoint-like file ddppo reads (resume state, ``ddppo eval``, transfer):
a damaged file and a file that carries pickled objects other than tensors and plain values are both refused
with a one-line ValueError naming the file, before anything in them runs."""

from __future__ import annotations

import pickle
import re
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import torch

from ddppo.atomic import atomic_open

CKPT_RE = re.compile(r"ckpt_(\d+)\.pt$")
# torch names the global its weights-only unpickler refused ("GLOBAL posix.system") or the opcode it does not know
_REFUSED_RE = re.compile(r"(GLOBAL [\w.]+|Unsupported operand \d+|Unsupported class [\w.]+)")


def save(obj: dict, path: str | Path) -> None:
    """Atomic (see ddppo/atomic.py): a failed write leaves the previous file at ``path`` and no temporary file."""
    try:
        with atomic_open(path) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        # torch's zip writer hides a failed write (a full disk) behind "unexpected pos ...": name the file and errno
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from e


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint without unpickling objects; any damage is a one-line ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: the error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # Not torch's advice (it suggests weights_only=False, i.e. running the file's code): name what was refused.
        found = _REFUSED_RE.search(str(e))
        if found and found[1].startswith("GLOBAL"):
            raise ValueError(f"checkpoint {path}: refused: it holds a pickled object that would run code "
                             f"({found[1]}); ddppo never runs code from a file") from None
        raise ValueError(f"checkpoint {path}: refused: damaged, or not only tensors and plain values"
                         f"{f' ({found[1]})' if found else ''}; ddppo never runs code from a file") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, OSError... for damaged files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path}: damaged, cannot be loaded ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, found {type(obj).__name__}")
    return obj


def _check_archive(path: Path) -> None:
    """torch.load reads a zip archive without checking its CRCs, so a corrupted block inside a tensor would load
    as silently wrong weights: check every member's CRC first (one sequential read)."""
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format (or not a checkpoint at all): torch.load decides
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as e:
        raise ValueError(f"checkpoint {path}: damaged archive ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise ValueError(f"checkpoint {path}: damaged (checksum error in {bad})")


def list_checkpoints(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if CKPT_RE.search(p.name)), key=lambda p: int(CKPT_RE.search(p.name)[1]))


def latest(path: str | Path, warn=None) -> Path:
    """A checkpoint file as given, or for a run directory (or its ``checkpoints/``) the newest checkpoint that
    loads: a damaged newer one is skipped with a one-line warning naming it, so a crash or a bad copy never
    leaves "the latest checkpoint" unusable while an older good one exists."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    path = Path(path)
    if not path.is_dir():
        return path
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = list_checkpoints(directory)
    for candidate in reversed(found):
        try:
            load(candidate)
            return candidate
        except ValueError as e:
            warn(f"ddppo: warning: skipping {e}")
    raise FileNotFoundError(f"no loadable checkpoint ckpt_<update>.pt in {directory}"
                            + (f" ({len(found)} damaged)" if found else ""))


def prune(directory: str | Path, keep: int) -> None:
    for p in list_checkpoints(directory)[:-keep]:
        p.unlink(missing_ok=True)
