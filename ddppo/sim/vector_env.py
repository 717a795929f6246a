"""The trainer's batched PointNav environment: tensors in, dict of tensors out, automatic reset."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf

from ddppo.numpy_views import HostViews
from ddppo.sim.batch_sim import BatchSimulator, SceneAtlas
from ddppo.sim.dataset import Episode, check_episodes_in_scenes, scene_name
from ddppo.sim.env_base import BatchedPointNavEnv, StepResult
from ddppo.sim.episode_order import make_iterators
from ddppo.sim.geometry import STOP
from ddppo.sim.navmesh import GeodesicCache, NavGrid


class PointNavVectorEnv(BatchedPointNavEnv):
    """``num_envs`` PointNav environments on one device, stepping together.

    Environment ``e`` of a worker with ``env_offset`` draws its episodes from stream ``env_offset + e`` of ``seed``,
    so ranks given offsets rank * num_envs never share a stream. Training shuffles every episode of the split in
    each environment: all scenes are resident here, so a batch that mixes scenes costs nothing and decorrelates the
    samples; ``group_by_scene=True`` gives habitat-lab's order instead (ddppo.sim.episode_order).
    """

    def __init__(self, episodes: list[Episode], navs: dict[str, NavGrid], num_envs: int, sim_cfg, task_cfg,
                 seed: int = 0, env_offset: int = 0, device: str | torch.device = "cpu", order: str = "shuffle",
                 num_shares: int | None = None, cache: GeodesicCache | None = None, group_by_scene: bool = False):
        # plain attributes: the step reads these settings every step, and OmegaConf reads are slow
        task = (SimpleNamespace(**OmegaConf.to_container(task_cfg, resolve=True))
                if OmegaConf.is_config(task_cfg) else task_cfg)
        super().__init__(episodes, num_envs, sim_cfg.resolution, sim_cfg.sensors, task, device, device)
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
        self.cache = cache or GeodesicCache()
        self.iterators = make_iterators(self.episode_scene, num_envs, seed, env_offset, order, num_shares,
                                        group_by_scene)
        self.counts_steps = group_by_scene and order == "shuffle"
        self.host = HostViews(self.start_x, self.start_z, self.start_theta, self.start_distance, self.prev_distance,
                              self.path_length, self.steps, self.collisions, self.episode_index, self.sim.x, self.sim.z,
                              self.sim.theta, self.sim.goal_x, self.sim.goal_z)
        # as the simulator's: numpy views for the numba kernels, the tensors for the torch ones
        self.kernel_arg = self.sim.kernels.argument(self.host)

    # ------------------------------------------------------------------------------------------- episodes
    def _start_episodes_untimed(self, env_ids: list[int]) -> list[int]:
        started, ks = self._next_episodes(env_ids)
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
    def step(self, actions: torch.Tensor) -> StepResult:
        actions = actions.to(self.device).long().reshape(-1)
        actions = torch.where(self.active, actions, STOP)
        was_active = self.active.clone()
        collided, moved = self.sim.step(actions)
        a = self.kernel_arg
        stop, terminated, truncated = self.sim.kernels.tally(self.task, actions, was_active, collided, moved,
                                                             a(self.steps), a(self.path_length), a(self.collisions))
        self._count_step(was_active)
        reward, metrics = self._reward_and_metrics(stop, was_active)
        return self._end_step(reward, terminated, truncated, metrics, collided)

    def _reward_and_metrics(self, stop: torch.Tensor, was_active: torch.Tensor
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The task's reward for the step just taken and its own entries of ``StepResult.info``, computed before
        the automatic reset replaces ended episodes. Other tasks (ddppo.sim.tasks) override this."""
        distance = self.sim.geodesic()
        a = self.kernel_arg
        reward, metrics = self.sim.kernels.pointnav_step(self.task, stop, was_active, a(self.prev_distance),
                                                         distance, a(self.start_distance), a(self.path_length))
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

    def _pose_state(self) -> dict[str, torch.Tensor]:
        return {"x": self.sim.x.cpu().clone(), "z": self.sim.z.cpu().clone(), "theta": self.sim.theta.cpu().clone()}

    def _restore_poses(self, state: dict) -> None:
        ids = torch.arange(self.num_envs, device=self.device)
        eps = [self.episodes[int(k)] for k in self.episode_index]
        navs = [self.navs[self.atlas.index[scene_name(ep.scene_id)]] for ep in eps]
        fields = [self.cache.get(nav, ep.goal_position[0], ep.goal_position[2]) for nav, ep in zip(navs, eps)]
        self.sim.place(ids, [self.atlas.index[n.scene.name] for n in navs], state["x"], state["z"], state["theta"],
                       fields, [ep.goal_position[0] for ep in eps], [ep.goal_position[2] for ep in eps])

