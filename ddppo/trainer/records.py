"""The trainer's named records: what one worker's run is made of (:class:`Run`), its counters, and what each phase
of the loop hands to the next (ddppo/trainer/loop.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ddppo.config import TrainConfig
from ddppo.distributed import DistInfo, RolloutCounter
from ddppo.rl.episode_stats import EpisodeStats
from ddppo.rl.flat_grads import FlatGradients
from ddppo.rl.storage import RolloutStorage
from ddppo.sim.env_base import BatchedPointNavEnv
from ddppo.trainer.hooks import BenchHooks
from ddppo.trainer.progress import ProgressDisplay
from ddppo.trainer.tensorboard import TBWriter
from ddppo.trainer.update import UpdateStats


@dataclass
class Counters:
    """The run's progress. The resume state saves it as a dict of these names (``state`` in resume.pt): a field
    added later needs a default, since older files lack it."""

    update: int = 0
    env_steps: int = 0
    """Over all workers."""
    episodes: int = 0
    wall_time: float = 0.0
    """Seconds of training, over every session of the run."""
    world_size: int = 1
    skipped_updates: int = 0
    """Updates rolled back for a NaN/Inf loss or gradient."""
    bad_in_a_row: int = 0

    def state_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """Take the values of a saved dict (in place: the learning-rate schedule reads ``env_steps`` from here)."""
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


@dataclass
class SyncWindow:
    """DD-PPO's straggler figures summed over the updates since the last log (a component of each rank's resume
    state)."""

    preempted_ranks: float = 0.0
    rollout_fraction: float = 0.0
    """Each update's mean over ranks of the share of its rollout a rank collected."""
    updates: float = 0.0
    wait_s: float = 0.0
    """Time a worker waits for the others after its rollout."""

    def add(self, preempted_ranks: float, rollout_fraction: float, wait_s: float) -> None:
        self.preempted_ranks += preempted_ranks
        self.rollout_fraction += rollout_fraction
        self.updates += 1.0
        self.wait_s += wait_s

    def metrics(self) -> dict[str, float]:
        """Per-update means, as TensorBoard scalars."""
        return {"ddppo/preempted_ranks": self.preempted_ranks / self.updates,
                "ddppo/rollout_fraction": self.rollout_fraction / self.updates,
                "ddppo/wait_s": self.wait_s / self.updates}

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sums as one float64 tensor, in field order (exact: every sum is a float64)."""
        return {"sums": torch.tensor(dataclasses.astuple(self), dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for f, value in zip(dataclasses.fields(self), torch.as_tensor(state["sums"], dtype=torch.float64).tolist(),
                            strict=True):
            setattr(self, f.name, value)


class Rollout(NamedTuple):
    """What :func:`ddppo.trainer.loop.collect_rollout` did on this rank."""

    steps: int
    """Steps collected: ``ppo.num_steps``, or fewer when preempted."""
    seconds: float
    sim_seconds: float
    """In the environments' step."""
    act_seconds: float
    """In the policy's action."""


class RolloutTotals(NamedTuple):
    """Every rank's rollout summed (one all-reduce)."""

    samples: float
    preempted_ranks: float
    rollout_fraction: float
    """Sum over ranks of the share of its rollout each collected."""


class Learned(NamedTuple):
    """What :func:`ddppo.trainer.loop.update` did."""

    stats: UpdateStats
    totals: RolloutTotals
    seconds: float
    wait_seconds: float
    """Waiting for the other ranks' rollouts (in ``seconds``)."""


class Timings(NamedTuple):
    """An update's seconds, each averaged over ranks (one all-reduce)."""

    rollout: float
    learn: float
    sim: float
    act: float
    wait: float


@dataclass(frozen=True)
class Preemption:
    """DD-PPO's straggler rule: once ``quorum`` workers (``ddppo.sync_frac`` of them) have finished their rollout, a
    worker still collecting stops at any step from ``from_step`` (``ddppo.min_rollout_frac`` of its steps) on; its
    truncated rollout is bootstrapped from the value where it stopped."""

    enabled: bool
    quorum: float
    from_step: float
    num_steps: int

    @classmethod
    def from_config(cls, cfg: TrainConfig, info: DistInfo) -> Preemption:
        return cls(info.enabled and cfg.ddppo.preemption, cfg.ddppo.sync_frac * info.world_size,
                   cfg.ddppo.min_rollout_frac * cfg.ppo.num_steps, cfg.ppo.num_steps)

    def stop_after(self, steps_done: int, counter: RolloutCounter) -> bool:
        """Whether a rollout that has taken ``steps_done`` steps stops there (the store is asked only when it may)."""
        return self.enabled and self.from_step <= steps_done < self.num_steps and counter.count() >= self.quorum


@dataclass
class StopRequest:
    """A SIGTERM / SIGUSR1 that arrived, acted on at the next update boundary."""

    signal: int | None = None


@dataclass
class Progress:
    """What moves as the run goes, apart from the components' own state: the counters (saved with the shared resume
    state as ``state``), the straggler window (each rank's, saved as ``sync_window``), the last logged metrics and
    the session's start."""

    counters: Counters
    window: SyncWindow = field(default_factory=SyncWindow)
    metrics: dict[str, float] = field(default_factory=dict)
    """The last logged metrics."""
    resumed_from: int = 0
    t_start: float = 0.0


@dataclass
class Run:
    """One worker's training: what :func:`ddppo.trainer.loop.set_up` builds once and every phase reads. The fields
    are fixed for the run (each component keeps its own state and saves itself: ``state_dict``/
    ``load_state_dict``); what moves is in ``progress``."""

    cfg: TrainConfig
    info: DistInfo
    run_dir: Path
    log: Callable[..., None]
    envs: BatchedPointNavEnv
    sim_device: torch.device
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grads: FlatGradients
    storage: RolloutStorage
    counter: RolloutCounter
    episodes: EpisodeStats
    """Returns, and sums over the episodes ended since the last log."""
    preemption: Preemption
    hooks: BenchHooks
    num_steps: int
    gamma: float
    bootstrap_time_limits: bool
    progress: Progress
    writer: TBWriter | None = None
    """TensorBoard, on rank 0."""
    display: ProgressDisplay | None = None
