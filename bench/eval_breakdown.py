"""Where an evaluated agent loses success and SPL: ``ddppo eval``'s per-episode records (``<agent>.jsonl``) split by
geodesic distance to the goal, and its failures by how they ended. Prints JSON.

    python bench/eval_breakdown.py runs/laptop_depth/eval/val/checkpoint.jsonl [--edges 0,5,10,15,20,30]

A failed episode either ran out of steps (``steps == task.max_episode_steps``: the agent never called STOP) or called
STOP away from the goal (``stopped_short``); ``spl_of_successes`` is the mean SPL of the successful episodes alone,
what path inefficiency costs once the agent does arrive.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"eval_breakdown: {path} does not exist (ddppo eval writes <out>/<agent>.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary(records: list[dict], max_steps: int) -> dict:
    successes = [r for r in records if r["success"] > 0]
    failures = [r for r in records if r["success"] == 0]
    timed_out = [r for r in failures if r["steps"] >= max_steps]
    return {
        "episodes": len(records),
        "success": mean([r["success"] for r in records]),
        "spl": mean([r["spl"] for r in records]),
        "spl_of_successes": mean([r["spl"] for r in successes]),
        "failures_timed_out": len(timed_out),
        "failures_stopped_short": len(failures) - len(timed_out),
        "distance_to_goal_of_failures": mean([r["distance_to_goal"] for r in failures]),
    }


def breakdown(records: list[dict], edges: list[float], max_steps: int) -> dict:
    buckets = {}
    for lo, hi in zip(edges, edges[1:]):
        inside = [r for r in records if lo <= r["geodesic_distance"] < hi]
        buckets[f"{lo:g}-{hi:g} m"] = summary(inside, max_steps)
    return {"all": summary(records, max_steps), "by_geodesic_distance": buckets}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path, help="an <agent>.jsonl written by ddppo eval")
    ap.add_argument("--edges", default="0,5,10,15,20,30", help="geodesic distance bucket edges in metres")
    ap.add_argument("--max-steps", type=int, default=500, help="task.max_episode_steps of the evaluation")
    args = ap.parse_args(argv)
    try:
        edges = [float(e) for e in args.edges.split(",")]
    except ValueError:
        raise SystemExit(f"eval_breakdown: --edges {args.edges!r} is not a comma-separated list of numbers") from None
    if len(edges) < 2 or edges != sorted(edges):
        raise SystemExit(f"eval_breakdown: --edges {args.edges!r} must be at least two increasing numbers")
    json.dump({"records": str(args.records), **breakdown(load_records(args.records), edges, args.max_steps)},
              sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
