"""bench/eval_breakdown.py: success and SPL by geodesic distance and failures by how they ended, on hand-made
records whose answers are counted by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "eval_breakdown.py"


@pytest.fixture(scope="module")
def eval_breakdown():
    spec = importlib.util.spec_from_file_location("eval_breakdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(geodesic: float, success: float, spl: float, steps: int, distance: float) -> dict:
    return {"geodesic_distance": geodesic, "success": success, "spl": spl, "steps": steps,
            "distance_to_goal": distance}


RECORDS = [
    record(3.0, 1.0, 0.9, 20, 0.1),    # near: success
    record(4.0, 0.0, 0.0, 12, 2.0),    # near: stopped 2 m short
    record(12.0, 1.0, 0.5, 90, 0.15),  # far: success, a long path
    record(14.0, 0.0, 0.0, 500, 6.0),  # far: ran out of steps
]


def test_buckets_and_failure_kinds_are_counted(eval_breakdown, tmp_path, capsys):
    path = tmp_path / "checkpoint.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert eval_breakdown.main([str(path), "--edges", "0,5,15"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["all"] == {"episodes": 4, "success": 0.5, "spl": pytest.approx(0.35), "spl_of_successes":
                          pytest.approx(0.7), "failures_timed_out": 1, "failures_stopped_short": 1,
                          "distance_to_goal_of_failures": 4.0}
    near, far = out["by_geodesic_distance"]["0-5 m"], out["by_geodesic_distance"]["5-15 m"]
    assert (near["episodes"], near["success"], near["failures_stopped_short"], near["failures_timed_out"]) == \
        (2, 0.5, 1, 0)
    assert (far["episodes"], far["spl_of_successes"], far["failures_timed_out"]) == (2, 0.5, 1)


def test_bad_edges_and_missing_file_are_one_line_errors(eval_breakdown, tmp_path):
    path = tmp_path / "checkpoint.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n")
    for edges in ("5,0", "0", "0,a"):
        with pytest.raises(SystemExit, match="--edges"):
            eval_breakdown.main([str(path), "--edges", edges])
    with pytest.raises(SystemExit, match="nothing.jsonl does not exist"):
        eval_breakdown.main([str(tmp_path / "nothing.jsonl")])
