"""Checkpoints and resume state: plain tensors and Python values only, so ``torch.load(weights_only=True)`` reads
them and loading never runs code. Every file is written atomically."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ddppo.atomic import atomic_open

CKPT_RE = re.compile(r"ckpt_(\d+)\.pt$")


def save(obj: dict, path: str | Path) -> None:
    with atomic_open(path) as f:
        torch.save(obj, f)


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint without unpickling objects; any damage is a one-line ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for damaged or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path}: cannot be loaded safely ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, found {type(obj).__name__}")
    return obj


def list_checkpoints(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if CKPT_RE.search(p.name)), key=lambda p: int(CKPT_RE.search(p.name)[1]))


def prune(directory: str | Path, keep: int) -> None:
    for p in list_checkpoints(directory)[:-keep]:
        p.unlink(missing_ok=True)
