"""Where the tests that take habitat-lab as the oracle run: wherever habitat-sim and habitat-lab import. They skip
with the reason elsewhere, and fail instead where DDPPO_REQUIRE_HABITAT is set (CI installs both), as
tests/habitat_support.py does for habitat-sim."""

from __future__ import annotations

import pytest
from habitat_support import habitat_required, need_habitat


def need_habitat_lab():
    """The ``habitat`` (habitat-lab) module; else skip (or fail where DDPPO_REQUIRE_HABITAT is set)."""
    need_habitat()
    try:
        import habitat
    except Exception as e:  # not installed, or a version that does not import beside this habitat-sim
        lines = str(e).strip().splitlines()
        reason = f"habitat-lab does not import here ({type(e).__name__}: {lines[0] if lines else ''})"
        if habitat_required():
            pytest.fail(f"DDPPO_REQUIRE_HABITAT is set but {reason}", pytrace=False)
        pytest.skip(reason)
    return habitat
