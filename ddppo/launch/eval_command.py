"""``ddppo eval CHECKPOINT``: the checkpoint and the reference agents on one table, per-episode JSONL, videos, under
a named protocol (ddppo.evaluation.evaluate.PROTOCOLS) that summary.json and the table state.

Under torchrun every rank evaluates its share of the episodes and rank 0 writes the results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ddppo.config import TrainConfig
from ddppo.distributed import init_distributed
from ddppo.evaluation.evaluate import (
    PolicyAgent,
    evaluate,
    evaluation_protocol,
    format_table,
    reference_agent,
    split_episodes,
    summarize,
    write_jsonl,
)
from ddppo.evaluation.trained_policy import policy_from_checkpoint, policy_spaces
from ddppo.io import checkpoint
from ddppo.io.atomic import atomic_write_text
from ddppo.policy import Policy

ORACLES = {
    "embedded": "oracle: ddppo's ShortestPathFollower (one step ahead in the geodesic field, through the simulator's "
                "own step; not habitat's GreedyGeodesicFollower: docs/scene_export.md)",
    "habitat": "oracle: habitat-sim's GreedyGeodesicFollower (the navmesh's shortest path)",
}
"""Which program the oracle row is, per backend: the two differ (docs/scene_export.md, "Collisions on both
backends")."""


def run_eval(args) -> int:
    protocol = evaluation_protocol(getattr(args, "protocol", None), args.sample, args.episodes)
    args.sample = protocol.sample  # what the videos' agent does too
    # a run directory stands for its newest checkpoint that loads (a damaged newer one is skipped with a warning)
    args.checkpoint = str(checkpoint.latest(args.checkpoint))
    policy, cfg = policy_from_checkpoint(args.checkpoint, args.overrides)
    if args.video and cfg.sim.backend != "embedded":  # before any evaluation runs
        raise ValueError(f"--video draws the embedded simulator's top-down map: it needs sim.backend=embedded, "
                         f"not {cfg.sim.backend!r}")
    info = init_distributed(cfg.device)
    policy = policy.to(info.device)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent / "eval" / args.split
    n = protocol.episodes or None
    agents = {"checkpoint": lambda envs: PolicyAgent(policy, envs.num_envs, info.device, not protocol.sample)}
    names = [a for a in args.agents.split(",") if a]
    if cfg.task.type != "pointnav" and "oracle" in names:  # its shortest path to the goal bounds PointNav only
        names.remove("oracle")
        if info.is_main:
            print(f"ddppo eval: no oracle reference for task.type={cfg.task.type}; skipped", file=sys.stderr)
    untrained = None
    if "untrained" in names:
        torch.manual_seed(cfg.seed)
        untrained = Policy(policy_spaces(cfg), cfg.policy).to(info.device).eval()
    for name in names:
        agents[name] = reference_agent(name, untrained, info.device, cfg.seed, deterministic=not protocol.sample)
    summaries = {}
    for name, make_agent in agents.items():
        torch.manual_seed(cfg.seed + info.rank)  # sampled actions: the same draws on a rerun
        records = evaluate(cfg, make_agent, args.split, n, args.num_envs, info)
        summaries[name] = summarize(records)
        if info.is_main:
            write_jsonl(records, out / f"{name}.jsonl")
    if info.is_main:
        described = {"name": protocol.name, "actions": "sampled" if protocol.sample else "most likely",
                     "episodes": "all" if protocol.episodes == 0 else protocol.episodes, "split": args.split}
        atomic_write_text(out / "summary.json", json.dumps({"protocol": described, **summaries}, indent=1))
        print(format_table(summaries, protocol.describe(args.split)))
        if "oracle" in summaries:
            print(ORACLES[cfg.sim.backend])
        print(f"per-episode records and summary in {out}")
        if args.video:
            _videos(cfg, policy, args, out, info.device)
    if info.enabled:
        torch.distributed.destroy_process_group()
    return 0


def _videos(cfg: TrainConfig, policy, args, out: Path, device) -> None:
    from ddppo.evaluation.video import add_video_to_tensorboard, record_episodes, write_mp4
    from ddppo.sim.tasks import TASKS
    from ddppo.trainer.tensorboard import TBWriter

    task, episodes, navs = split_episodes(cfg, args.split, args.video)
    videos = record_episodes(episodes, navs, cfg.sim, task,
                             lambda envs: PolicyAgent(policy, envs.num_envs, device, not args.sample),
                             env_class=TASKS[cfg.task.type])
    writer = TBWriter(out / "tb")
    for ep, frames in zip(episodes, videos):
        path = write_mp4(frames, out / "videos" / f"episode_{ep.episode_id}.mp4")
        add_video_to_tensorboard(writer, f"video/episode_{ep.episode_id}", frames, 0)
        print(f"video: {path} ({len(frames)} frames)")
    writer.close()
