"""What PointNav's batched environments share, whichever simulator moves the agents: the embedded one
(``ddppo.sim.vector_env.PointNavVectorEnv``) or one simulator per worker process (``ddppo.sim.worker_env``,
habitat-sim's way). Both have the same observations, step result, automatic reset, episode streams, per-episode
records and resume state; only how agents are placed, moved, observed and measured differs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ddppo.numpy_views import put_rows
from ddppo.sim.dataset import Episode
from ddppo.sim.episode_order import load_iterators
from ddppo.sim.task import METRICS


@dataclass
class StepResult:
    obs: dict[str, torch.Tensor]
    """Observations after the step; for envs whose episode ended, the first observation of the next episode."""
    reward: torch.Tensor
    terminated: torch.Tensor
    """The agent called STOP."""
    truncated: torch.Tensor
    """The step limit ended the episode (bootstrap from ``final_obs``)."""
    info: dict[str, torch.Tensor]
    """Per-env metrics of the episode that ended (valid where terminated | truncated), ``collided`` this step,
    ``active`` (False once an env's episodes are exhausted in partition order)."""
    final_obs: dict[str, torch.Tensor]
    """Observations before the automatic reset (equal to ``obs`` where no episode ended)."""

    @property
    def done(self) -> torch.Tensor:
        return self.terminated | self.truncated


class BatchedPointNavEnv:
    """``num_envs`` PointNav environments stepping together: tensors in, a :class:`StepResult` of tensors out.

    A subclass sets ``self.iterators`` (the episode streams, ddppo.sim.episode_order) and ``self.sim`` (whose ``x``,
    ``z``, ``theta`` are the agents' poses), and provides ``_start_episodes_untimed``, ``_observe``, ``step``,
    ``oracle_actions`` and ``_restore_poses``."""

    episode_metrics = ("success", "spl", "softspl", "distance_to_goal", "collisions")
    """Keys of ``StepResult.info`` that describe an episode when it ends: the trainer logs their means."""
    record_metrics = METRICS
    """Keys of ``StepResult.info`` that evaluation records per episode and summarises."""
    has_goal = True
    """The episode's goal is part of the task (videos draw it); Flee and Exploration ignore it."""
    _STATE = ("start_x", "start_z", "start_theta", "start_distance", "prev_distance", "path_length", "steps",
              "collisions", "episode_index", "active")
    """The per-env tensors a resume state saves."""
    counts_steps = True
    """Whether the episode streams are told of every step (a scene-grouped stream leaves a scene after a number)."""

    def __init__(self, episodes: list[Episode], num_envs: int, resolution: int, sensors, task,
                 device: str | torch.device, state_device: str | torch.device):
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs} must be >= 1")
        if not episodes:
            raise ValueError("no episode to run")
        self.episodes, self.num_envs, self.task = episodes, num_envs, task
        self.resolution, self.sensors = int(resolution), tuple(sensors)
        self.device = torch.device(device)
        z = lambda dt=torch.float32: torch.zeros(num_envs, device=state_device, dtype=dt)  # noqa: E731
        self.start_x, self.start_z, self.start_theta = z(), z(), z()
        self.start_distance, self.prev_distance, self.path_length = z(), z(), z()
        self.steps, self.collisions, self.episode_index = z(torch.long), z(torch.long), z(torch.long)
        self.active = torch.ones(num_envs, dtype=torch.bool, device=state_device)
        self.reset_seconds = 0.0
        """Wall time spent starting episodes (geodesic fields and scene loads included): a benchmark's reset share."""

    @property
    def obs_spaces(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        r = self.resolution
        spaces = {}
        if "rgb" in self.sensors:
            spaces["rgb"] = ((r, r, 3), torch.uint8)
        if "depth" in self.sensors:
            spaces["depth"] = ((r, r, 1), torch.float32)
        spaces["pointgoal_with_gps_compass"] = ((2,), torch.float32)
        spaces["gps"] = ((2,), torch.float32)
        spaces["compass"] = ((1,), torch.float32)
        return spaces

    # ------------------------------------------------------------------------------------------- episodes
    def _start_episodes(self, env_ids: list[int]) -> list[int]:
        """Load the next episode into each env; returns the envs that got one."""
        t0 = time.perf_counter()
        try:
            return self._start_episodes_untimed(env_ids)
        finally:
            self.reset_seconds += time.perf_counter() - t0

    def _next_episodes(self, env_ids: list[int]) -> tuple[list[int], list[int]]:
        """(envs, episode indices) of the envs whose stream has a next episode; the others become inactive."""
        started, episodes = [], []
        for e, active in zip(env_ids, self.active[env_ids].tolist()):
            k = self.iterators[e].next() if active else None
            if k is None:
                self.active[e] = False
            else:
                started.append(e)
                episodes.append(k)
        return started, episodes

    def _count_step(self, was_active: torch.Tensor) -> None:
        if self.counts_steps:
            for e in was_active.nonzero().flatten().tolist():
                self.iterators[e].step_taken()

    def _end_step(self, reward: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
                  metrics: dict[str, torch.Tensor], collided: torch.Tensor) -> StepResult:
        """The step's result: the episode records as the step left them, then the automatic reset of the envs
        whose episode ended."""
        info = {
            **metrics,
            "collisions": self.collisions.clone(), "steps": self.steps.clone(),
            "path_length": self.path_length.clone(), "geodesic_distance": self.start_distance.clone(),
            "episode_index": self.episode_index.clone(), "collided": collided,
            # the pose reached by this step and the goal, before any automatic reset replaces them
            "agent_x": self.sim.x.clone(), "agent_z": self.sim.z.clone(), "agent_theta": self.sim.theta.clone(),
            "goal_x": self.goal_x.clone(), "goal_z": self.goal_z.clone(),
        }
        obs = self._observe()
        final_obs = self._start_next_episodes(obs, terminated | truncated)
        info["active"] = self.active.clone()
        dev = self.device
        return StepResult(obs, reward.to(dev), terminated.to(dev), truncated.to(dev),
                          {k: v.to(dev) for k, v in info.items()}, final_obs)

    def _start_next_episodes(self, obs: dict[str, torch.Tensor], done: torch.Tensor) -> dict[str, torch.Tensor]:
        """Automatic reset: environments whose episode ended start their next one and their rows of ``obs`` become
        its first observation. Returns the observations as the ended episodes left them."""
        ended = done.nonzero().flatten().tolist()
        if not ended:
            return obs
        final_obs = {k: v.clone() for k, v in obs.items()}
        started = self._start_episodes(ended)
        if started:
            for k, v in self._observe(torch.tensor(started, device=self.device)).items():
                put_rows(obs[k], started, v)
        return final_obs

    # ------------------------------------------------------------------------------------------- API
    def reset(self) -> dict[str, torch.Tensor]:
        self._start_episodes(list(range(self.num_envs)))
        return self._observe()

    def restart(self, env_ids: list[int]) -> dict[str, torch.Tensor]:
        """Abandon the current episodes of ``env_ids`` and start their next ones; returns all observations."""
        self._start_episodes(list(env_ids))
        return self._observe()

    def observe(self) -> dict[str, torch.Tensor]:
        """Observations of the current state (after ``load_state_dict``)."""
        return self._observe()

    def current_episodes(self) -> list[Episode | None]:
        return [self.episodes[int(k)] if a else None for k, a in zip(self.episode_index, self.active)]

    def state_dict(self) -> dict:
        """Everything needed to continue mid-episode: iterator positions, agent poses, episode counters."""
        state = {k: getattr(self, k).cpu().clone() for k in self._STATE}
        state.update(self._pose_state())
        state["iterators"] = [it.state_dict() for it in self.iterators]
        return state

    def load_state_dict(self, state: dict) -> None:
        load_iterators(self.iterators, state["iterators"])
        for k in self._STATE:
            getattr(self, k).copy_(state[k])
        self._restore_poses(state)

    def _pose_state(self) -> dict[str, torch.Tensor]:
        """Agent poses a resume state saves beyond ``_STATE``."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
