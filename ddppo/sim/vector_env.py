"""The trainer's batched PointNav environment: tensors in, dict of tensors out, automatic reset."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf

from ddppo.rows import HostViews, put_rows
from ddppo.sim.batch_sim import BatchSimulator, SceneAtlas
from ddppo.sim.dataset import Episode, check_episodes_in_scenes, scene_name
from ddppo.sim.episode_order import EpisodeIterator, load_iterators, make_iterators  # noqa: F401  (re-exported)
from ddppo.sim.geometry import STOP
from ddppo.sim.navmesh import GeodesicCache, NavGrid
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


def count_steps(iterators, was_active: torch.Tensor) -> None:
    """Tell the episode streams of the environments that just stepped (a scene-grouped stream leaves a scene
    after a number of steps)."""
    for e in was_active.nonzero().flatten().tolist():
        iterators[e].step_taken()


def start_next_episodes(env, obs: dict[str, torch.Tensor], done: torch.Tensor) -> dict[str, torch.Tensor]:
    """Automatic reset, for every backend: environments whose episode ended start their next one and their rows of
    ``obs`` become its first observation. Returns the observations as the ended episodes left them."""
    ended = done.nonzero().flatten().tolist()
    if not ended:
        return obs
    final_obs = {k: v.clone() for k, v in obs.items()}
    started = env._start_episodes(ended)
    if started:
        for k, v in env._observe(torch.tensor(started, device=env.device)).items():
            put_rows(obs[k], started, v)
    return final_obs


class PointNavVectorEnv:
    """``num_envs`` PointNav environments on one device, stepping together.

    Environment ``e`` of a worker with ``env_offset`` draws its episodes from stream ``env_offset + e`` of ``seed``,
    so ranks given offsets rank * num_envs never share a stream. Training shuffles every episode of the split in
    each environment: all scenes are resident here, so a batch that mixes scenes costs nothing and decorrelates the
    samples; ``group_by_scene=True`` gives habitat-lab's order instead (ddppo.sim.episode_order).
    """

    episode_metrics = ("success", "spl", "softspl", "distance_to_goal", "collisions")
    """Keys of ``StepResult.info`` that describe an episode when it ends: the trainer logs their means."""
    record_metrics = METRICS
    """Keys of ``StepResult.info`` that evaluation records per episode and summarises."""
    has_goal = True
    """The episode's goal is part of the task (videos draw it); Flee and Exploration ignore it."""

    def __init__(self, episodes: list[Episode], navs: dict[str, NavGrid], num_envs: int, sim_cfg, task_cfg,
                 seed: int = 0, env_offset: int = 0, device: str | torch.device = "cpu", order: str = "shuffle",
                 num_shares: int | None = None, cache: GeodesicCache | None = None, group_by_scene: bool = False):
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs} must be >= 1")
        if not episodes:
            raise ValueError("no episode to run")
        self.device = torch.device(device)
        self.episodes = episodes
        self.num_envs = num_envs
        names = sorted({scene_name(e.scene_id) for e in episodes})
        missing = [n for n in names if n not in navs]
        if missing:
            raise ValueError(f"episodes name scene(s) {missing[:3]} that are not loaded")
        self.navs = [navs[n] for n in names]
        check_episodes_in_scenes(episodes, navs, lambda k: f"episode {k}")
        self.atlas = SceneAtlas(self.navs, self.device)
        # the episodes as arrays, so starting episodes is a gather rather than a walk over Episode objects
        self.episode_scene = np.array([self.atlas.index[scene_name(e.scene_id)] for e in episodes], np.int64)
        self.episode_start = np.array([(e.start_position[0], e.start_position[2], e.start_heading) for e in episodes])
        self.episode_goal = np.array([(e.goal_position[0], e.goal_position[2]) for e in episodes])
        self.sim = BatchSimulator(
            self.atlas, num_envs, sim_cfg.resolution, tuple(sim_cfg.sensors), kernels=sim_cfg.kernels,
            forward_step=sim_cfg.forward_step, turn_angle=sim_cfg.turn_angle, max_depth=sim_cfg.max_depth,
        )
        # plain attributes: the step reads these settings every step, and an OmegaConf read costs ~25 us
        self.task = (SimpleNamespace(**OmegaConf.to_container(task_cfg, resolve=True))
                     if OmegaConf.is_config(task_cfg) else task_cfg)
        self.cache = cache or GeodesicCache()
        self.iterators = make_iterators(self.episode_scene, num_envs, seed, env_offset, order, num_shares,
                                        group_by_scene)
        self._count_steps = group_by_scene and order == "shuffle"
        z = lambda dt=torch.float32: torch.zeros(num_envs, device=self.device, dtype=dt)  # noqa: E731
        self.start_x, self.start_z, self.start_theta = z(), z(), z()
        self.start_distance, self.prev_distance, self.path_length = z(), z(), z()
        self.steps, self.collisions = z(torch.long), z(torch.long)
        self.episode_index = z(torch.long)
        self.active = torch.ones(num_envs, dtype=torch.bool, device=self.device)
        self.host = HostViews(self.start_x, self.start_z, self.start_theta, self.start_distance, self.prev_distance,
                              self.path_length, self.steps, self.collisions, self.episode_index, self.sim.x, self.sim.z,
                              self.sim.theta, self.sim.goal_x, self.sim.goal_z)
        # as the simulator's: numpy views for the numba kernels, the tensors for the torch ones
        self.kernel_arg = self.sim.kernels.argument(self.host)
        self.reset_seconds = 0.0
        """Wall time spent starting episodes (geodesic fields included): the reset share of a benchmark."""

    # ------------------------------------------------------------------------------------------- spaces
    @property
    def obs_spaces(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        r = self.sim.resolution
        spaces = {}
        if "rgb" in self.sim.sensors:
            spaces["rgb"] = ((r, r, 3), torch.uint8)
        if "depth" in self.sim.sensors:
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

    def _start_episodes_untimed(self, env_ids: list[int]) -> list[int]:
        started, ks = [], []
        for e, active in zip(env_ids, self.active[env_ids].tolist()):
            k = self.iterators[e].next() if active else None
            if k is None:
                self.active[e] = False
            else:
                started.append(e)
                ks.append(k)
        if not started:
            return started
        ks = np.array(ks)
        scene_idx, (xs, zs, ths), (gxs, gzs) = self.episode_scene[ks], self.episode_start[ks].T, self.episode_goal[ks].T
        fields = [self.cache.get(self.navs[s], gx, gz)
                  for s, gx, gz in zip(scene_idx.tolist(), gxs.tolist(), gzs.tolist())]
        self.sim.place(started, scene_idx, xs, zs, ths, fields, gxs, gzs)
        d0 = self.sim.geodesic(torch.tensor(started, device=self.device))
        for dst, values in ((self.episode_index, ks), (self.start_x, xs), (self.start_z, zs), (self.start_theta, ths),
                            (self.start_distance, d0), (self.prev_distance, d0), (self.path_length, 0.0),
                            (self.steps, 0), (self.collisions, 0)):
            self.host.put(dst, started, values)
        return started

    def _observe(self, env_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        obs = self.sim.render(env_ids)
        sim = self.sim
        obs["pointgoal_with_gps_compass"], obs["gps"], obs["compass"] = self.sim.kernels.pose_sensors(env_ids, *map(
            self.kernel_arg, (sim.x, sim.z, sim.theta, self.goal_x, self.goal_z, self.start_x, self.start_z,
                              self.start_theta)))
        return obs

    # ------------------------------------------------------------------------------------------- API
    def reset(self) -> dict[str, torch.Tensor]:
        self._start_episodes(list(range(self.num_envs)))
        return self._observe()

    def step(self, actions: torch.Tensor) -> StepResult:
        actions = actions.to(self.device).long().reshape(-1)
        actions = torch.where(self.active, actions, STOP)
        was_active = self.active.clone()
        collided, moved = self.sim.step(actions)
        a = self.kernel_arg
        stop, terminated, truncated = self.sim.kernels.tally(self.task, actions, was_active, collided, moved,
                                                             a(self.steps), a(self.path_length), a(self.collisions))
        if self._count_steps:
            count_steps(self.iterators, was_active)
        reward, metrics = self._reward_and_metrics(stop, was_active)
        done = terminated | truncated
        info = {
            **metrics,
            "collisions": self.collisions.clone(),
            "steps": self.steps.clone(),
            "path_length": self.path_length.clone(),
            "geodesic_distance": self.start_distance.clone(),
            "episode_index": self.episode_index.clone(),
            "collided": collided,
            # the pose reached by this step and the goal, before any automatic reset replaces them
            "agent_x": self.sim.x.clone(), "agent_z": self.sim.z.clone(), "agent_theta": self.sim.theta.clone(),
            "goal_x": self.goal_x.clone(), "goal_z": self.goal_z.clone(),
        }
        obs = self._observe()
        final_obs = start_next_episodes(self, obs, done)
        info["active"] = self.active.clone()
        return StepResult(obs, reward, terminated, truncated, info, final_obs)

    def _reward_and_metrics(self, stop: torch.Tensor, was_active: torch.Tensor
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The task's reward for the step just taken and its own entries of ``StepResult.info``, computed before
        the automatic reset replaces ended episodes. Other tasks (ddppo.transfer.tasks) override this."""
        distance = self.sim.geodesic()
        a = self.kernel_arg
        reward, metrics = self.sim.kernels.pointnav_step(self.task, stop, was_active, a(self.prev_distance), distance,
                                              a(self.start_distance), a(self.path_length))
        self.prev_distance.copy_(distance)  # in place: its numpy view (self.host) stays valid
        return reward, metrics

    @property
    def goal_x(self) -> torch.Tensor:
        return self.sim.goal_x

    @property
    def goal_z(self) -> torch.Tensor:
        return self.sim.goal_z

    def oracle_actions(self) -> torch.Tensor:
        """Each env's next action along the shortest path (ddppo.sim.oracle); every backend offers this agent."""
        from ddppo.sim.oracle import ShortestPathFollower

        return ShortestPathFollower(self).act()

    def restart(self, env_ids: list[int]) -> dict[str, torch.Tensor]:
        """Abandon the current episodes of ``env_ids`` and start their next ones; returns all observations."""
        self._start_episodes(env_ids)
        return self._observe()

    def current_episodes(self) -> list[Episode | None]:
        return [self.episodes[int(k)] if a else None for k, a in zip(self.episode_index, self.active)]

    _STATE = ("start_x", "start_z", "start_theta", "start_distance", "prev_distance", "path_length", "steps",
              "collisions", "episode_index", "active")

    def state_dict(self) -> dict:
        """Everything needed to continue mid-episode: iterator positions, agent poses, episode counters."""
        state = {k: getattr(self, k).cpu().clone() for k in self._STATE}
        state.update(x=self.sim.x.cpu().clone(), z=self.sim.z.cpu().clone(), theta=self.sim.theta.cpu().clone())
        state["iterators"] = [it.state_dict() for it in self.iterators]
        return state

    def load_state_dict(self, state: dict) -> None:
        load_iterators(self.iterators, state["iterators"])
        for k in self._STATE:
            getattr(self, k).copy_(state[k])
        ids = torch.arange(self.num_envs, device=self.device)
        eps = [self.episodes[int(k)] for k in self.episode_index]
        navs = [self.navs[self.atlas.index[scene_name(ep.scene_id)]] for ep in eps]
        fields = [self.cache.get(nav, ep.goal_position[0], ep.goal_position[2]) for nav, ep in zip(navs, eps)]
        self.sim.place(ids, [self.atlas.index[n.scene.name] for n in navs], state["x"], state["z"], state["theta"],
                       fields, [ep.goal_position[0] for ep in eps], [ep.goal_position[2] for ep in eps])

    def observe(self) -> dict[str, torch.Tensor]:
        """Observations of the current state (after ``load_state_dict``)."""
        return self._observe()

    def close(self) -> None:
        pass

