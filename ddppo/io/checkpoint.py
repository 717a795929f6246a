"""Checkpoints and resume state: plain tensors and Python values only, so ``torch.load(weights_only=True)`` reads
them and loading never runs code. Every file is written atomically.

``load`` is the one loader of every checkpoint-like file ddppo reads (resume state, ``ddppo eval``, transfer):
a damaged file and a file that carries pickled objects other than tensors and plain values are both refused
with a one-line ValueError naming the file, before anything in them runs.

One exception, read without running code either: habitat-baselines' checkpoints pickle their config, an OmegaConf
DictConfig of its structured-config dataclasses, beside the weights. The types that needs are an explicit list
(CONFIG_RECORD_TYPES, TYPE_REFERENCES, REFERENCED_TYPE_MODULES, EMPTY_DICT_FACTORIES); the weights-only unpickler
reads them into inert stand-ins (the type's fields as a plain record, a referenced class as its name), never an
instance of the type, and ``load`` hands back plain dicts and lists. A file needing any other type is refused,
naming it."""

from __future__ import annotations

import pickle
import re
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import torch

from ddppo.io.atomic import atomic_open

CKPT_RE = re.compile(r"ckpt_(\d+)\.pt$")
# torch names the global its weights-only unpickler refused ("GLOBAL posix.system") or the opcode it does not know
_REFUSED_RE = re.compile(r"(GLOBAL [\w.]+|Unsupported operand \d+|Unsupported class [\w.]+)")


def save(obj: dict, path: str | Path) -> None:
    """Atomic (see ddppo/io/atomic.py): a failed write leaves the previous file at ``path`` and no temporary file."""
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


CONFIG_RECORD_TYPES = frozenset(f"omegaconf.{name}" for name in (
    "dictconfig.DictConfig", "listconfig.ListConfig", "base.ContainerMetadata", "base.Metadata", "nodes.AnyNode",
    "nodes.StringNode", "nodes.IntegerNode", "nodes.FloatNode", "nodes.BooleanNode", "nodes.BytesNode"))
"""OmegaConf's containers, value nodes and their metadata: read as ConfigRecord (their pickled fields)."""
TYPE_REFERENCES = frozenset({"typing.Any", "typing.Dict", "typing.List", "typing.Tuple", "typing.Optional",
                             "typing.Union", *(f"builtins.{t}" for t in ("dict", "list", "tuple", "int", "float",
                                                                         "str", "bool", "bytes"))})
"""Types a config's metadata names (a node's declared type): read as their names."""
REFERENCED_TYPE_MODULES = ("habitat.config.default_structured_configs",
                           "habitat_baselines.config.default_structured_configs")
"""Modules whose classes (habitat's structured-config dataclasses) a config's metadata names: read as names."""
EMPTY_DICT_FACTORIES = frozenset({"collections.defaultdict"})
"""Called by the pickle to make a metadata cache: an empty dict instead."""


class _Refused(ValueError):
    """load's own one-line refusal (any other exception while loading means a damaged file)."""


class ConfigRecord:
    """The pickled fields of an OmegaConf object (in ``__dict__``): the weights-only unpickler makes one where the
    pickle asks for a CONFIG_RECORD_TYPES object (object.__new__ and a __dict__ update, nothing of OmegaConf)."""


def _empty_dict(*_args) -> dict:
    return {}


def _readable(name: str) -> bool:
    return (name in CONFIG_RECORD_TYPES or name in TYPE_REFERENCES or name in EMPTY_DICT_FACTORIES
            or name.rsplit(".", 1)[0] in REFERENCED_TYPE_MODULES)


def _stand_in(name: str):
    if name in CONFIG_RECORD_TYPES:
        return ConfigRecord
    return _empty_dict if name in EMPTY_DICT_FACTORIES else name


def _plain(x):
    """ConfigRecords as the plain values they hold: a container's content, a node's value, None for metadata."""
    if isinstance(x, ConfigRecord):
        fields = vars(x)
        return _plain(fields["_content"] if "_content" in fields else fields.get("_val"))
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _torch_load(path: Path, map_location, stand_ins=()):
    with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: the error says it
        warnings.simplefilter("ignore")
        with torch.serialization.safe_globals(list(stand_ins)):
            return torch.load(path, map_location=map_location, weights_only=True)


def _load_with_config_records(path: Path, map_location, refused: str):
    """The file read with every global it names replaced by its stand-in, or a one-line refusal naming a global
    outside the allow-list. ``refused``: the global torch's weights-only unpickler stopped at."""
    names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)) if zipfile.is_zipfile(path) else []
    foreign = [n for n in names if not _readable(n)] if names else [refused]
    if foreign:
        raise _Refused(f"checkpoint {path}: refused: it holds a pickled object that would run code "
                         f"(GLOBAL {', '.join(foreign[:3])}); ddppo never runs code from a file")
    return _plain(_torch_load(path, map_location, [(_stand_in(n), n) for n in names]))


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint without unpickling objects; any damage is a one-line ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        try:
            obj = _torch_load(path, map_location)
        except pickle.UnpicklingError as e:
            # Not torch's advice (it suggests weights_only=False, i.e. running the file's code): name what was
            # refused, unless it is a config the allow-list reads as plain data.
            found = _REFUSED_RE.search(str(e))
            if not (found and found[1].startswith("GLOBAL")):
                raise _Refused(f"checkpoint {path}: refused: damaged, or not only tensors and plain values"
                                 f"{f' ({found[1]})' if found else ''}; ddppo never runs code from a file") from None
            obj = _load_with_config_records(path, map_location, found[1].split()[1])
    except _Refused:
        raise
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
