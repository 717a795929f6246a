"""Tests that need a piece of the system: root, network namespaces (ip, nsenter, unshare), a tmpfs mount, the SLURM
daemons, habitat-sim, habitat-lab and habitat-baselines. On a machine without the piece such a test skips, saying
why; where DDPPO_REQUIRE_SYSTEM is set (.ci/run sets it, after installing and starting every piece) it fails
instead, so CI cannot go green with a system test silently skipped. The one skip CI allows is the CUDA test's."""

from __future__ import annotations

import os

import pytest

SWITCH = "DDPPO_REQUIRE_SYSTEM"


def system_required() -> bool:
    return os.environ.get(SWITCH, "") not in ("", "0")


def lacking(reason: str):
    """Skip with ``reason``, or fail with it where DDPPO_REQUIRE_SYSTEM is set. Never returns."""
    if system_required():
        pytest.fail(f"{SWITCH} is set but {reason}", pytrace=False)
    pytest.skip(reason)


def need(reason: str | None) -> None:
    """``lacking(reason)`` when a check found a piece missing (``reason`` not None)."""
    if reason is not None:
        lacking(reason)
