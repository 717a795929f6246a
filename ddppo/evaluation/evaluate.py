"""Evaluation: every episode of a split exactly once (partitioned across ranks and environments), per-episode
records with the path walked, means with 95% confidence intervals, and the reference agents that give every
number its floor and ceiling (shortest-path oracle, random, always-forward, untrained weights)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ddppo.config import TrainConfig
from ddppo.distributed import DistInfo
from ddppo.evaluation.episodes import ForwardAgent, OracleAgent, PolicyAgent, RandomAgent, agent_steps
from ddppo.io.atomic import atomic_open
from ddppo.sim.dataset import load_episodes
from ddppo.sim.dataset_dir import ensure_dataset, episodes_path, load_split
from ddppo.sim.environments import make_vector_env
from ddppo.sim.geometry import MOVE_FORWARD
from ddppo.sim.task import METRICS
from ddppo.sim.vector_env import PointNavVectorEnv

REFERENCE_AGENTS = ("oracle", "random", "forward", "untrained")
PROTOCOLS = ("ddppo", "habitat")
"""How ``ddppo eval`` evaluates a policy. ddppo: its most likely action, on the first ``--episodes`` (100) episodes
of the split (the protocol of training's evaluations too); habitat: actions sampled from it, on every episode of the
split, as habitat-baselines' evaluator (``test_episode_count: -1``, ``deterministic=False``). The numbers of the
two are not comparable: sampling costs success and SPL, and the first 100 episodes are not the split."""
DDPPO_PROTOCOL_EPISODES = 100
STILL_MOVE = 0.01
"""Metres: a forward step that moved less than this moved nothing (its observation barely changed)."""
STUCK_RUN = 20
"""An episode ends stuck when its last this-many actions were forward steps that moved nothing: an agent pressing
into geometry until the step limit (docs/scene_export.md, "Collisions on both backends")."""


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: its name (one of PROTOCOLS, or custom), sampled or most likely actions, and how many
    episodes of the split (0 = all)."""

    name: str
    sample: bool
    episodes: int

    def describe(self, split: str) -> str:
        actions = "actions sampled from the policy" if self.sample else "the policy's most likely action"
        which = f"every episode of {split}" if self.episodes == 0 else f"the first {self.episodes} episodes of {split}"
        return f"protocol {self.name}: {actions}, {which}"


def evaluation_protocol(name: str | None, sample: bool | None = None, episodes: int | None = None) -> Protocol:
    """The protocol ``--protocol`` names, with ``--sample``/``--deterministic`` and ``--episodes`` (None: not given).
    A flag that contradicts the named protocol is a one-line ValueError. Without a name the flags choose (most
    likely actions and 100 episodes unless given): ddppo if the actions are the most likely, habitat if sampled on
    every episode, custom otherwise."""
    if name is not None and name not in PROTOCOLS:
        raise ValueError(f"--protocol {name}: use one of {', '.join(PROTOCOLS)}")
    if name == "habitat":
        if sample is False or episodes not in (None, 0):
            raise ValueError("--protocol habitat samples actions on every episode of the split: drop "
                             f"{'--deterministic' if sample is False else f'--episodes {episodes}'}")
        return Protocol("habitat", True, 0)
    if name == "ddppo" and sample:
        raise ValueError("--protocol ddppo takes the policy's most likely action: drop --sample")
    sample = bool(sample)
    episodes = DDPPO_PROTOCOL_EPISODES if episodes is None else episodes
    if episodes < 0:
        raise ValueError(f"--episodes {episodes}: use 0 (every episode) or more")
    named = "ddppo" if not sample else ("habitat" if episodes == 0 else "custom")
    return Protocol(named, sample, episodes)


def run_episodes(envs: PointNavVectorEnv, agent, on_step=None) -> list[dict]:
    """Step ``agent`` until every env has run its share of episodes; one record per episode, with its path.

    ``on_step(envs, result)`` is called after every step (videos use it)."""
    n = envs.num_envs
    obs = envs.reset()
    paths = [[(float(envs.sim.x[e]), float(envs.sim.z[e]))] for e in range(n)]
    actions_taken: list[list[int]] = [[] for _ in range(n)]
    still_run = [0] * n  # forward steps in a row that moved nothing, up to now
    records = []
    for actions, r, *_ in agent_steps(envs, agent, obs):
        if on_step is not None:
            on_step(envs, r)
        for e in range(n):
            if r.info["active"][e] or r.done[e]:
                position = (float(r.info["agent_x"][e]), float(r.info["agent_z"][e]))
                still = int(actions[e]) == MOVE_FORWARD and math.dist(position, paths[e][-1]) < STILL_MOVE
                still_run[e] = still_run[e] + 1 if still else 0
                paths[e].append(position)
                actions_taken[e].append(int(actions[e]))
        for e in r.done.nonzero().flatten().tolist():
            ep = envs.episodes[int(r.info["episode_index"][e])]
            row = {"episode_id": ep.episode_id, "scene_id": ep.scene_id}
            row.update({k: float(r.info[k][e]) for k in envs.record_metrics})
            row.update(motion_record(row, still_run[e]))
            row["goal"] = [float(r.info["goal_x"][e]), float(r.info["goal_z"][e])]
            row["path"] = paths[e]
            row["actions"] = actions_taken[e]
            records.append(row)
            paths[e] = [(float(envs.sim.x[e]), float(envs.sim.z[e]))]
            actions_taken[e] = []
            still_run[e] = 0
    return records


def motion_record(metrics: dict, still_run: int) -> dict:
    """How an episode moved, beside its task metrics: ``any_collision`` (1.0 or 0.0, so its mean is the share of
    episodes with a collision), ``ended_stuck`` (1.0 when its last STUCK_RUN actions were forward steps that moved
    nothing) and ``still_run_at_end`` (how many there were)."""
    out = {"still_run_at_end": still_run, "ended_stuck": float(still_run >= STUCK_RUN)}
    if "collisions" in metrics:
        out["any_collision"] = float(metrics["collisions"] > 0)
    return out


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    t = torch.tensor(values, dtype=torch.float64)
    half = 1.96 * t.std(unbiased=True).item() / math.sqrt(n) if n > 1 else math.nan
    return t.mean().item(), half


def summarize(records: list[dict]) -> dict:
    """Mean and 95% CI of every metric the records carry (their float fields: each task records its own)."""
    out: dict = {"episodes": len(records)}
    metrics = [k for k, v in records[0].items() if isinstance(v, float)] if records else METRICS
    for k in metrics:
        out[k], out[f"{k}_ci95"] = mean_ci95([r[k] for r in records])
    if records and "collisions" in records[0]:  # a few pinned episodes can carry the mean: the median says so
        out["collisions_median"] = float(torch.tensor([r["collisions"] for r in records]).median())
    return out


def split_episodes(cfg: TrainConfig, split: str, num_episodes: int | None):
    task = OmegaConf.merge(cfg.task, {"split": split})
    ensure_dataset(task, cfg.dataset, log=lambda *_: None)
    episodes, navs = load_split(task.data_dir, split)
    if num_episodes:
        episodes = episodes[:num_episodes]
    return task, episodes, navs


def evaluate(cfg: TrainConfig, make_agent, split: str = "val", num_episodes: int | None = 100, num_envs: int = 8,
             info: DistInfo | None = None, on_step=None) -> list[dict]:
    """Every episode once: rank r of W takes episodes r, r+W, ...; its envs split those again. All ranks return
    the records of all episodes, in dataset order. ``make_agent(envs) -> agent``."""
    info = info or DistInfo()
    cfg = OmegaConf.merge(cfg, {"task": {"split": split}})
    ensure_dataset(cfg.task, cfg.dataset, log=lambda *_: None)
    episodes = load_episodes(episodes_path(cfg.task.data_dir, split))
    if num_episodes:
        episodes = episodes[:num_episodes]
    mine = list(range(info.rank, len(episodes), info.world_size))
    records: list[dict] = []
    if mine:
        envs = make_vector_env(cfg, split, min(num_envs, len(mine)), episode_ids=mine, order="partition",
                               device="cpu" if cfg.sim.device == "auto" else cfg.sim.device)
        records = run_episodes(envs, make_agent(envs), on_step)
    if info.enabled:
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    order = {ep.episode_id: k for k, ep in enumerate(episodes)}
    return sorted(records, key=lambda r: order[r["episode_id"]])


def evaluate_policy(policy, cfg: TrainConfig, split: str = "val", num_episodes: int = 100, num_envs: int = 8,
                    deterministic: bool = True, device="cpu", info: DistInfo | None = None) -> dict:
    """Mean metrics (with 95% CIs) of ``policy`` over the first ``num_episodes`` episodes of ``split``."""
    was_training = policy.training
    policy.eval()
    try:
        records = evaluate(cfg, lambda envs: PolicyAgent(policy, envs.num_envs, device, deterministic), split,
                           num_episodes, num_envs, info)
    finally:
        policy.train(was_training)
    return summarize(records)


def reference_agent(kind: str, untrained_policy=None, device="cpu", seed: int = 0, deterministic: bool = True):
    """``make_agent`` for a reference agent by name (see REFERENCE_AGENTS); ``deterministic``: how the untrained
    policy acts (as the evaluated one does)."""
    makers = {
        "oracle": lambda envs: OracleAgent(envs),
        "random": lambda envs: RandomAgent(envs.num_envs, seed),
        "forward": lambda envs: ForwardAgent(envs.num_envs),
        "untrained": lambda envs: PolicyAgent(untrained_policy, envs.num_envs, device, deterministic=deterministic),
    }
    if kind not in makers:
        raise ValueError(f"reference agent {kind!r}: use one of {', '.join(REFERENCE_AGENTS)}")
    return makers[kind]


def write_jsonl(records: list[dict], path: str | Path) -> None:
    with atomic_open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def format_table(summaries: dict[str, dict], heading: str = "") -> str:
    """Plain-text table: one row per agent, mean ± 95% CI per metric; ``heading`` (e.g. the protocol) above it."""
    cols = ("success", "spl", "softspl", "distance_to_goal", "collisions", "any_collision", "ended_stuck", "steps")
    first = next(iter(summaries.values()), {})
    if not all(c in first for c in cols):  # another task (Flee, Exploration): its own metrics
        cols = tuple(k for k in first if k not in ("episodes", "collisions_median") and not k.endswith("_ci95"))
    medians = all("collisions_median" in s for s in summaries.values())
    head = (f"{'agent':<12}{'episodes':>9}" + "".join(f"{c:>20}" for c in cols)
            + (f"{'collisions_median':>19}" if medians else ""))
    lines = ([heading] if heading else []) + [head, "-" * len(head)]
    for name, s in summaries.items():
        cells = "".join(f"{s[c]:>11.3f} ± {s[c + '_ci95']:<6.3f}" for c in cols)
        median = f"{s['collisions_median']:>19.1f}" if medians else ""
        lines.append(f"{name:<12}{s['episodes']:>9}{cells}{median}")
    return "\n".join(lines)
