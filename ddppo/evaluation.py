"""Deterministic evaluation of a policy on a split: each episode exactly once, metrics per episode and mean."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from ddppo.sim.data import ensure_dataset, load_split
from ddppo.sim.task import METRICS
from ddppo.sim.vector_env import PointNavVectorEnv


@torch.no_grad()
def run_episodes(envs: PointNavVectorEnv, act) -> list[dict]:
    """Step ``act(obs, prev_actions, masks, hidden) -> (actions, hidden)`` until every env has run its share."""
    n = envs.num_envs
    obs = envs.reset()
    results = []
    state = {"prev": torch.zeros(n, dtype=torch.long), "masks": torch.zeros(n), "hidden": None}
    while envs.active.any():
        actions, state["hidden"] = act(obs, state["prev"], state["masks"], state["hidden"])
        r = envs.step(actions)
        for e in r.done.nonzero().flatten().tolist():
            row = {k: float(r.info[k][e]) for k in METRICS}
            ep = envs.episodes[int(r.info["episode_index"][e])]
            row.update(episode_id=ep.episode_id, scene_id=ep.scene_id)
            results.append(row)
        obs = r.obs
        state["prev"] = actions.cpu().long()
        state["masks"] = (~r.done).float()
    return results


def summarize(results: list[dict]) -> dict:
    out = {"episodes": len(results)}
    for k in METRICS:
        vals = torch.tensor([r[k] for r in results], dtype=torch.float64)
        out[k] = vals.mean().item() if len(vals) else float("nan")
    return out


def evaluate_policy(policy, cfg, split: str = "val", num_episodes: int = 100, num_envs: int = 8,
                    deterministic: bool = True, device="cpu") -> dict:
    """Mean metrics of ``policy`` over the first ``num_episodes`` episodes of ``split``."""
    task = OmegaConf.merge(cfg.task, {"split": split})
    ensure_dataset(task, cfg.dataset, log=lambda *_: None)
    episodes, navs = load_split(task.data_dir, split)
    episodes = episodes[:num_episodes]
    envs = PointNavVectorEnv(episodes, navs, min(num_envs, len(episodes)), cfg.sim, task, order="partition",
                             device="cpu" if cfg.sim.device == "auto" else cfg.sim.device)
    was_training = policy.training
    policy.eval()

    def act(obs, prev, masks, hidden):
        if hidden is None:
            hidden = policy.initial_hidden(envs.num_envs, device)
        obs = {k: v.to(device) for k, v in obs.items()}
        actions, _, _, hidden = policy.act(obs, prev.to(device), masks.to(device), hidden,
                                           deterministic=deterministic)
        return actions.cpu(), hidden

    results = run_episodes(envs, act)
    policy.train(was_training)
    return summarize(results)
