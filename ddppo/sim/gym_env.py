"""gymnasium front-ends: ``gymnasium.make("ddppo/PointNav-v0", ...)`` for one environment, and a
``gymnasium.vector.VectorEnv`` over the batched simulator for many."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from ddppo.config import DatasetConfig, SimConfig, TaskConfig
from ddppo.sim.dataset_dir import ensure_dataset, load_split
from ddppo.sim.topdown import top_down_map
from ddppo.sim.vector_env import PointNavVectorEnv


def _observation_space(env: PointNavVectorEnv) -> spaces.Dict:
    out = {}
    for key, (shape, _dtype) in env.obs_spaces.items():
        if key == "rgb":
            out[key] = spaces.Box(0, 255, shape, np.uint8)
        elif key == "depth":
            out[key] = spaces.Box(0.0, 1.0, shape, np.float32)
        elif key == "compass":
            out[key] = spaces.Box(-math.pi, math.pi, shape, np.float32)
        else:
            out[key] = spaces.Box(-np.inf, np.inf, shape, np.float32)
    return spaces.Dict(out)


def _numpy(obs: dict[str, torch.Tensor], row=None) -> dict[str, np.ndarray]:
    return {k: (v[row] if row is not None else v).cpu().numpy() for k, v in obs.items()}


def _make_vector(num_envs, split, data_dir, resolution, sensors, max_episode_steps, seed, device, order,
                 generate_if_missing):
    sim_cfg = SimConfig(resolution=resolution, sensors=list(sensors), device=device)
    task_cfg = TaskConfig(data_dir=data_dir, split=split, max_episode_steps=max_episode_steps,
                          generate_if_missing=generate_if_missing)
    ensure_dataset(task_cfg, DatasetConfig(), log=lambda *_: None)
    episodes, navs = load_split(data_dir, split)
    return PointNavVectorEnv(episodes, navs, num_envs, sim_cfg, task_cfg, seed=seed, device=device, order=order)


class PointNavEnv(gym.Env):
    """One PointNav episode at a time. ``info`` carries agent_position, agent_rotation, goal_position,
    distance_to_goal, success, spl (and softspl, collisions, collided)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, split: str = "train", data_dir: str = "data/pointnav", resolution: int = 64,
                 sensors=("rgb", "depth"), max_episode_steps: int = 500, seed: int = 0, device: str = "cpu",
                 render_mode: str | None = None, generate_if_missing: bool = True):
        self._args = dict(num_envs=1, split=split, data_dir=data_dir, resolution=resolution, sensors=sensors,
                          max_episode_steps=max_episode_steps, device=device, order="shuffle",
                          generate_if_missing=generate_if_missing)
        self._seed = seed
        self.env = _make_vector(seed=seed, **self._args)
        self.observation_space = _observation_space(self.env)
        self.action_space = spaces.Discrete(4)
        self.render_mode = render_mode
        self._path: list[tuple[float, float]] = []
        self._started = False
        self._episode_over = False

    @staticmethod
    def _pose_info(x: float, z: float, theta: float, goal_x: float, goal_z: float) -> dict:
        return {
            "agent_position": np.array([x, 0.0, z], np.float32),
            "agent_rotation": np.array([0.0, math.sin(theta / 2), 0.0, math.cos(theta / 2)], np.float32),
            "goal_position": np.array([goal_x, 0.0, goal_z], np.float32),
        }

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        if seed is not None or not self._started:
            self.env.iterators = [type(it)(it.n, self._seed if seed is None else seed, 0) for it in self.env.iterators]
            obs = self.env.reset()
            self._started = True
        elif self._episode_over:
            obs = self.env.observe()  # the vector env began the next episode when the last one ended
        else:
            obs = self.env.restart([0])  # reset mid-episode (e.g. by a TimeLimit wrapper): next episode
        self._episode_over = False
        sim = self.env.sim
        self._path = [(float(sim.x[0]), float(sim.z[0]))]
        info = self._pose_info(float(sim.x[0]), float(sim.z[0]), float(sim.theta[0]), float(sim.goal_x[0]),
                               float(sim.goal_z[0]))
        info.update(distance_to_goal=float(sim.geodesic()[0]), success=0.0, spl=0.0)
        return _numpy(obs, 0), info

    def step(self, action):
        r = self.env.step(torch.tensor([int(action)]))
        done = bool(r.done[0])
        i = r.info
        x, z = float(i["agent_x"][0]), float(i["agent_z"][0])
        self._path.append((x, z))
        info = self._pose_info(x, z, float(i["agent_theta"][0]), float(i["goal_x"][0]), float(i["goal_z"][0]))
        info["collided"] = bool(i["collided"][0])
        info["distance_to_goal"] = float(i["distance_to_goal"][0])
        if done:
            info.update({k: float(i[k][0]) for k in ("success", "spl", "softspl", "collisions")})
            self._episode_over = True
        else:
            info.update(success=0.0, spl=0.0)
        obs = r.final_obs if done else r.obs
        return _numpy(obs, 0), float(r.reward[0]), bool(r.terminated[0]), bool(r.truncated[0]), info

    def render(self):
        env = self.env
        nav = env.navs[int(env.sim.scene_of[0])]
        return top_down_map(nav.scene, nav.navigable, self._path, (float(env.goal_x[0]), float(env.goal_z[0])),
                            self._path[-1], float(env.sim.theta[0]))


class PointNavGymVectorEnv(gym.vector.VectorEnv):
    """Many PointNav environments in one batched simulator, with gymnasium's vector API (same-step autoreset:
    ``infos["final_obs"]`` holds the observation before the reset of envs whose episode ended)."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int = 8, split: str = "train", data_dir: str = "data/pointnav",
                 resolution: int = 64, sensors=("depth",), max_episode_steps: int = 500, seed: int = 0,
                 device: str = "cpu", generate_if_missing: bool = True):
        self.env = _make_vector(num_envs, split, data_dir, resolution, sensors, max_episode_steps, seed, device,
                                "shuffle", generate_if_missing)
        self.num_envs = num_envs
        self.single_observation_space = _observation_space(self.env)
        self.single_action_space = spaces.Discrete(4)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)

    def reset(self, *, seed: int | None = None, options=None):
        if seed is not None:
            self.env.iterators = [type(it)(it.n, seed, e) for e, it in enumerate(self.env.iterators)]
        return _numpy(self.env.reset()), {}

    def step(self, actions):
        r = self.env.step(torch.as_tensor(np.asarray(actions)))
        infos = {k: v.cpu().numpy() for k, v in r.info.items()}
        infos["final_obs"] = _numpy(r.final_obs)
        infos["episode_done"] = r.done.cpu().numpy()
        return (_numpy(r.obs), r.reward.cpu().numpy(), r.terminated.cpu().numpy(), r.truncated.cpu().numpy(),
                infos)
