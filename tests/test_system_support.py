"""The switch that turns a skip for a missing system piece into a failure (tests/system_support.py), run for real
on a test that needs a piece no machine has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from system_support import SWITCH

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("switch, outcome", [(None, "1 skipped"), ("1", "1 failed")])
def test_a_missing_piece_skips_or_fails_under_the_switch(tmp_path, switch, outcome):
    (tmp_path / "test_piece.py").write_text(
        "from system_support import need\n\n\ndef test_piece():\n    need('no flux capacitor here')\n")
    env = {k: v for k, v in os.environ.items() if k != SWITCH}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if switch:
        env[SWITCH] = switch
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert outcome in done.stdout, done.stdout
    assert "no flux capacitor here" in done.stdout  # the reason, said either way
