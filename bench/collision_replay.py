"""One evaluation's collisions on both backends, from the same poses: every forward step of ``ddppo eval``'s
per-episode records on the embedded simulator (``<agent>.jsonl``) taken again by habitat-sim's navmesh of the same
scene (``ddppo scene export``'s ``.navmesh``), from the pose and heading the embedded agent had. Prints JSON.

    python bench/collision_replay.py EVAL_DIR/checkpoint.jsonl EXPORTED_DIR [--split val]

Both sides flag a step by habitat-sim's rule (the squared distance moved fell short of the full step's by more than
1e-5 m²). A flag on one side only is sorted by where the embedded agent touched: at a convex corner of the geometry
or along a face (``Scene.nearest_geometry`` after the step). ``pinned`` counts steps that moved under 1 cm on the
embedded simulator while habitat's navmesh moves the agent 5 cm or more, to where the agent's disc fits; poses that
habitat's navmesh does not hold (snapping moves them 1 cm or more) are counted apart (``off_habitat``; those the
embedded simulator flagged: ``off_habitat_flagged``), as in tests/test_pinning.py.
Needs habitat-sim.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from ddppo.sim.dataset import load_episodes, scene_name
from ddppo.sim.dataset_dir import episodes_path
from ddppo.sim.geometry import MOVE_FORWARD, TURN_LEFT, TURN_RIGHT
from ddppo.sim.habitat_backend import require_habitat_sim
from ddppo.sim.kernels.motion import COLLISION_EPS
from ddppo.sim.navmesh import AGENT_RADIUS
from ddppo.sim.scene import load_scene

ON_BOTH = 0.01
STILL, HABITAT_MOVES = 0.01, 0.05


def collided(dx: float, dz: float, forward_step: float) -> bool:
    return dx * dx + dz * dz + COLLISION_EPS < forward_step * forward_step


def replay(records: list[dict], exported: Path, split: str, forward_step: float, turn: float) -> dict:
    hs = require_habitat_sim()
    episodes = {e.episode_id: e for e in load_episodes(episodes_path(exported, split))}
    finders, scenes = {}, {}
    count = dict(forward_steps=0, both=0, ours_only_corner=0, ours_only_face=0, theirs_only_corner=0,
                 theirs_only_face=0, off_habitat=0, off_habitat_flagged=0, pinned=0)
    for record in records:
        name = scene_name(record["scene_id"])
        if name not in finders:
            finders[name] = hs.nav.PathFinder()
            if not finders[name].load_nav_mesh(str(exported / f"{name}.navmesh")):
                raise SystemExit(f"collision_replay: {exported / name}.navmesh does not load (ddppo scene export)")
            scenes[name] = load_scene(exported / "scenes" / f"{name}.npz")
        heading = episodes[record["episode_id"]].start_heading
        path = record["path"]
        for t, action in enumerate(record["actions"]):
            if action in (TURN_LEFT, TURN_RIGHT):
                heading += turn if action == TURN_LEFT else -turn
            if action != MOVE_FORWARD:
                continue
            count["forward_steps"] += 1
            kind = _compare(finders[name], scenes[name], path[t], path[t + 1], heading, forward_step)
            if kind:
                count[kind] += 1
            if kind == "off_habitat" and collided(*np.subtract(path[t + 1], path[t]), forward_step):
                count["off_habitat_flagged"] += 1
    return count


def habitat_step(finder, x: float, z: float, heading: float, forward_step: float) -> tuple[float, float] | None:
    """Where habitat-sim's navmesh (a PathFinder) moves an agent at (x, z) with ``heading`` forward (try_step to the
    full step's end), as (x, z); None where the navmesh does not hold the pose (snapping moves it ON_BOTH or more:
    from such a start try_step first snaps, and its answer says nothing of ours)."""
    position = np.array([x, 0.0, z], np.float32)
    snapped = np.asarray(finder.snap_point(position))
    if math.hypot(snapped[0] - x, snapped[2] - z) >= ON_BOTH:
        return None
    target = position + forward_step * np.array([-math.sin(heading), 0.0, -math.cos(heading)], np.float32)
    end = np.asarray(finder.try_step(position, target))
    return float(end[0]), float(end[2])


def _compare(finder, scene, start, end, heading: float, forward_step: float) -> str | None:
    """Which counter one forward step adds to (None: flagged by neither, or pinned on neither)."""
    theirs_end = habitat_step(finder, start[0], start[1], heading, forward_step)
    if theirs_end is None:
        return "off_habitat"
    theirs_dx, theirs_dz = theirs_end[0] - start[0], theirs_end[1] - start[1]
    ours = collided(end[0] - start[0], end[1] - start[1], forward_step)
    theirs = collided(theirs_dx, theirs_dz, forward_step)
    if math.dist(start, end) < STILL and math.hypot(theirs_dx, theirs_dz) >= HABITAT_MOVES \
            and scene.nearest_geometry(*theirs_end)[0] >= AGENT_RADIUS - ON_BOTH:
        return "pinned"
    if ours and theirs:
        return "both"
    if ours == theirs:
        return None
    at_corner = scene.nearest_geometry(*end)[1]
    return f"{'ours' if ours else 'theirs'}_only_{'corner' if at_corner else 'face'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path, help="an <agent>.jsonl that ddppo eval wrote on the embedded simulator")
    ap.add_argument("exported", type=Path, help="ddppo scene export's output for the same dataset (with .navmesh)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--forward-step", type=float, default=0.25)
    ap.add_argument("--turn-angle", type=float, default=10.0, help="degrees")
    args = ap.parse_args(argv)
    if not args.records.is_file():
        raise SystemExit(f"collision_replay: {args.records} does not exist (ddppo eval writes <out>/<agent>.jsonl)")
    if not episodes_path(args.exported, args.split).is_file():
        raise SystemExit(f"collision_replay: {episodes_path(args.exported, args.split)} does not exist "
                         "(ddppo scene export DATA --out EXPORTED_DIR)")
    records = [json.loads(line) for line in args.records.read_text().splitlines() if line.strip()]
    counts = replay(records, args.exported, args.split, args.forward_step, math.radians(args.turn_angle))
    json.dump({"records": str(args.records), "episodes": len(records), **counts}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
