"""Where the habitat tests run: wherever habitat-sim imports. On a machine without it (a user's fresh clone) they
skip with the import error and the install command; where it must be there (CI installs the habitat-sim wheel and
sets DDPPO_REQUIRE_SYSTEM, tests/system_support.py) a missing habitat-sim fails the test instead of skipping it."""

from __future__ import annotations

from system_support import lacking


def need_habitat():
    """The ``habitat_sim`` module; else skip (or fail where DDPPO_REQUIRE_SYSTEM is set) with the reason."""
    from ddppo.sim.habitat_backend import HabitatUnavailable, require_habitat_sim

    try:
        return require_habitat_sim()
    except HabitatUnavailable as e:
        lacking(str(e))


def need_habitat_baselines():
    """The ``habitat_baselines`` package (imported by tests/helpers/habitat_baselines_import.py, which says why that
    takes more than an import here); else skip (or fail where DDPPO_REQUIRE_SYSTEM is set) with the reason."""
    from helpers.habitat_baselines_import import HabitatBaselinesUnavailable, import_habitat_baselines

    try:
        return import_habitat_baselines()
    except HabitatBaselinesUnavailable as e:
        lacking(f"{e} (pip install habitat-baselines==0.3.320260507 beside habitat-sim 0.3.3)")
