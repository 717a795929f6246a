"""Per-episode statistics of a rollout: each environment's running return, and sums over the episodes that ended."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class EpisodeSummary(NamedTuple):
    """The episodes that ended in a window (over every rank, when the sums were all-reduced)."""

    episodes: int
    means: dict[str, float]
    """``episode/<name>`` means; empty without episodes."""


class EpisodeStats:
    """The return of every environment's current episode, and since the last :meth:`take` the number of episodes
    that ended and the sums of their return and of the task's episode metrics (``info[name]`` at the ended step).

    Kept in numpy on the host: a step's bookkeeping is a handful of small numpy calls, each an order of magnitude
    cheaper than the same torch call on a small CPU, and on a GPU only the reward and done flags (and the metrics of
    steps where an episode ended) cross to the host. Returns accumulate in float32 like the rewards, sums in float64.
    """

    def __init__(self, num_envs: int, metrics: Sequence[str]):
        self.metrics = tuple(metrics)
        self.names = ("reward", *self.metrics)
        """What the sums are of, in order: the return first, then the metrics."""
        self.episode_return = np.zeros(num_envs, np.float32)
        self.sums = np.zeros(len(self.names) + 1, np.float64)
        """[episodes ended, sum of their returns, sum of each metric] since the last :meth:`take`."""

    def add(self, reward: Tensor, done: Tensor, info: Mapping[str, Tensor]) -> None:
        """Record one step: ``reward`` and ``done`` are ``[N]`` (any device); ``info`` holds each metric ``[N]``."""
        self.episode_return += reward.cpu().numpy()
        ended = np.flatnonzero(done.cpu().numpy())
        if ended.size:
            self.sums[0] += ended.size
            self.sums[1] += self.episode_return[ended].sum(dtype=np.float64)
            for k, name in enumerate(self.metrics, start=2):
                self.sums[k] += info[name].cpu().numpy()[ended].sum(dtype=np.float64)
            self.episode_return[ended] = 0.0

    def take(self) -> list[float]:
        """The sums since the last call (see :attr:`sums`), which start again from zero."""
        out = self.sums.tolist()
        self.sums[:] = 0.0
        return out

    def means(self, sums: Sequence[float]) -> dict[str, float]:
        """``episode/<name>`` means from sums as :meth:`take` returns them (summed over ranks); empty without
        episodes."""
        if sums[0] <= 0:
            return {}
        return {f"episode/{name}": float(sums[k + 1]) / float(sums[0]) for k, name in enumerate(self.names)}

    def summarize(self, sums: Sequence[float]) -> EpisodeSummary:
        """The count and :meth:`means` of sums as :meth:`take` returns them (summed over ranks)."""
        return EpisodeSummary(int(sums[0]), self.means(sums))

    def state_dict(self) -> dict[str, Tensor]:
        """Copies, for exact resume (``window`` / ``episode_return``: the names resume files have always used)."""
        return {"window": torch.from_numpy(self.sums.copy()),
                "episode_return": torch.from_numpy(self.episode_return.copy())}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for key, dst in (("window", self.sums), ("episode_return", self.episode_return)):
            src = torch.as_tensor(state[key]).cpu().numpy()
            if src.shape != dst.shape:
                raise ValueError(f"resume state: {key} has shape {src.shape}, expected {dst.shape}")
            dst[:] = src
