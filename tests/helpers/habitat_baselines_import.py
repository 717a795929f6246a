"""Import habitat-baselines where it is installed but its torchvision dependency cannot load as shipped.

Why this exists: habitat-baselines imports torchvision (for its image transforms). PyPI's torchvision 0.28.0 wheel is
a CUDA build: its compiled operators need libtorch_cuda, which a CPU build of torch does not have, so they do not
load. Its ``_meta_registrations.py`` then registers fake (meta) kernels for ``torchvision::nms`` and
``torchvision::qnms`` without checking that those operators exist (its other registrations do check), and
``import torchvision`` dies with "operator torchvision::nms does not exist". Declaring the two operator schemas
with ``torch.library`` first (a definition only, no kernel) lets torchvision's pure-Python parts import. Nothing of
habitat-baselines that ddppo's tests use calls them; a call of a detection operator would still fail loudly (no
kernel), never compute something wrong.

``import_habitat_baselines()`` is the one way the tests import it; where it does not import it raises
``HabitatBaselinesUnavailable`` with the reason (tests/habitat_support.py turns that into a skip, or a failure where
DDPPO_REQUIRE_SYSTEM is set).
"""

from __future__ import annotations

import importlib
import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # kept alive: torch drops a Library's definitions when the object is collected


class HabitatBaselinesUnavailable(ImportError):
    """habitat-baselines (or something it needs) does not import here; the message says why."""


def _declare_torchvision_schemas() -> None:
    global _library
    missing = [name for name in _SCHEMAS if not hasattr(torch.ops.torchvision, name)]
    if not missing:
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_SCHEMAS[name])


def import_habitat_baselines():
    """The ``habitat_baselines`` package with PointNavResNetPolicy, PPO and RolloutStorage importable."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise HabitatBaselinesUnavailable(f"torchvision does not import: {e}") from e
        _declare_torchvision_schemas()
        for module in [m for m in list(sys.modules) if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
    except ImportError as e:
        raise HabitatBaselinesUnavailable(f"torchvision does not import: {e}") from e
    try:
        for module in ("habitat_baselines", "habitat_baselines.rl.ddppo.policy.resnet_policy",
                       "habitat_baselines.rl.ppo.ppo", "habitat_baselines.common.rollout_storage"):
            importlib.import_module(module)
    except Exception as e:  # ImportError, or torchvision/habitat failing at import time
        raise HabitatBaselinesUnavailable(f"habitat_baselines does not import ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return importlib.import_module("habitat_baselines")
