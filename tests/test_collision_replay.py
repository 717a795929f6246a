"""bench/collision_replay.py: an embedded evaluation's forward steps taken again by habitat-sim's navmesh from the
same poses. An always-forward agent on the exported val scenes presses into walls: its records are replayed, every
forward step is counted once, the flags both backends raise dominate, and none is pinned."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from habitat_support import need_habitat

from ddppo.config import load_config
from ddppo.evaluation.episodes import ForwardAgent
from ddppo.evaluation.evaluate import evaluate, write_jsonl
from ddppo.sim.geometry import MOVE_FORWARD

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "collision_replay.py"


def replay(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_forward_agent_replayed_on_habitat(habitat_exported_dataset, tmp_path):
    need_habitat()
    data = habitat_exported_dataset
    cfg = load_config(None, [f"task.data_dir={data}", "task.generate_if_missing=false", "task.max_episode_steps=60"])
    records = evaluate(cfg, lambda envs: ForwardAgent(envs.num_envs), "val", 10, 2)
    write_jsonl(records, tmp_path / "forward.jsonl")
    done = replay(tmp_path / "forward.jsonl", data)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert counts["episodes"] == 10
    assert counts["forward_steps"] == sum(a == MOVE_FORWARD for r in records for a in r["actions"])
    ours = sum(r["collisions"] for r in records)
    only_ours = counts["ours_only_corner"] + counts["ours_only_face"]
    assert counts["both"] + only_ours == ours - counts["off_habitat_flagged"]
    assert counts["both"] >= 0.8 * ours and counts["pinned"] == 0, counts


def test_missing_inputs_are_one_line_errors(tmp_path):
    done = replay(tmp_path / "none.jsonl", tmp_path)
    assert done.returncode != 0 and "does not exist" in done.stderr and len(done.stderr.strip().splitlines()) == 1
