"""The Habitat-Sim backend: habitat's scenes (Gibson, MP3D, HM3D ...) and PointNav datasets behind the trainer's
batched environment interface.

Each environment is a ``habitat_sim.Simulator`` in its own worker process (habitat-sim runs one simulator per
process), rendering on the GPU of the worker's local rank. Everything task-level — episode order, reward, success,
SPL, the goal/GPS/compass sensors — is computed in the main process by the same code as the embedded backend
(``ddppo.sim.worker_env.WorkerVectorEnv``); the simulator only moves the agent, renders and answers geodesic
queries with its navmesh. habitat-sim is imported lazily, so this module loads without it.

Written against habitat-sim's documented Python API, 0.2.x and 0.3.x (checked against the v0.2.0 - v0.3.3
sources). Where they differ in what we use:

- sensor specs: ``CameraSensorSpec`` (hfov as a property taking degrees) from 0.2.0 on; before it, a generic
  ``SensorSpec`` with the projection in its string map ``parameters["hfov"]``;
- ``Agent.set_state`` converts a rotation given as coefficients only from a ``list`` or ``ndarray`` in 0.2.0
  (any non-quaternion from 0.2.1 on): we always pass a list [x, y, z, w];
- ``Simulator.recompute_navmesh(pathfinder, settings)``: 0.2.x also takes ``include_static_objects`` (default
  False), 0.3.x reads it from the settings; the two-argument call means the same in both;
- ``SimulatorConfiguration.scene_dataset_config_file`` is set only where it exists.
Collisions come from the ``"collided"`` entry that ``Simulator.step`` adds to its observations (both versions;
habitat-lab's ``previous_step_collided`` is that value, kept by its own wrapper).

Agent: habitat's default body, radius 0.1 m and height 1.5 m (ddppo.sim.navmesh), sensors at 1.25 m with a 90°
HFOV. Collisions and sliding follow the scene's navmesh, whose own margin is the agent radius it was built with
(habitat's datasets ship navmeshes built for this agent). As under habitat-lab (``default_agent_navmesh``), a scene
without a ``.navmesh``, or whose ``.navmesh`` was made with other settings (another agent radius, say), gets one
computed with the agent's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ddppo.config import TrainConfig
from ddppo.sim.geometry import MOVE_FORWARD, STOP, TURN_LEFT, TURN_RIGHT
from ddppo.sim.navmesh import AGENT_HEIGHT, AGENT_RADIUS, SENSOR_HEIGHT

INSTALL_HINT = ("conda install habitat-sim withbullet headless -c conda-forge -c aihabitat "
                "(or use the Docker image: see README, 'Habitat backend / cloud GPUs')")
TESTED_HABITAT_SIM = "0.3.3"
"""The habitat-sim release CI runs the habitat tests on (and the Docker image pins)."""
HFOV = 90.0
AGENT_MAX_CLIMB, AGENT_MAX_SLOPE = 0.2, 45.0
NAVMESH_CELL_HEIGHT = 0.2
"""habitat-sim's default navmesh ``cell_height`` (habitat-lab keeps it), stated because the exported scenes' floor
slab is sized to it (ddppo.sim.scene_export)."""
"""habitat-lab's agent defaults (``AgentConfig.max_climb`` in metres, ``max_slope`` in degrees), which its
``default_agent_navmesh`` puts in the navmesh settings."""
ACTION_NAMES = {MOVE_FORWARD: "move_forward", TURN_LEFT: "turn_left", TURN_RIGHT: "turn_right"}
QUIET_LOGS = {"HABITAT_SIM_LOG": "quiet", "MAGNUM_LOG": "quiet"}
"""habitat-sim's and Magnum's own logging settings: errors only."""


class HabitatUnavailable(ImportError):
    """habitat-sim does not import here; the message is one line that says how to install it."""


def require_habitat_sim():
    """The ``habitat_sim`` module, or HabitatUnavailable naming the import error and the install command.

    habitat-sim speaks only when something is wrong: its own log and Magnum's (the GL banner every process prints)
    are set to quiet unless the user set them (``HABITAT_SIM_LOG=verbose MAGNUM_LOG=verbose`` shows everything;
    both are read when habitat-sim loads, so they are set before the import, and worker processes inherit them)."""
    for variable, value in QUIET_LOGS.items():
        os.environ.setdefault(variable, value)
    try:
        import habitat_sim
    except Exception as e:  # not installed, or a build whose compiled parts (magnum bindings) are missing
        lines = str(e).strip().splitlines()
        raise HabitatUnavailable(
            f"sim.backend=habitat needs habitat-sim, which does not import here ({type(e).__name__}: "
            f"{lines[0] if lines else ''}); install it with: {INSTALL_HINT}"
        ) from None
    return habitat_sim


# ---------------------------------------------------------------------------------------- pure translation
def yaw_of_quaternion(q) -> float:
    """Heading about +y (turning left increases it; 0 looks along -z) of rotation [x, y, z, w], read from where
    the rotation sends the view direction (0, 0, -1): exact for rotations about y, robust to tiny tilts."""
    x, y, z, w = (float(v) for v in q)
    # R @ (0, 0, -1) = -(2(xz + wy), 2(yz - wx), 1 - 2(x^2 + y^2)); yaw = atan2(-f_x, -f_z)
    return math.atan2(2.0 * (x * z + w * y), 1.0 - 2.0 * (x * x + y * y))


DEFAULT_SCENE_PATH_PREFIX = "data/scene_datasets/"
"""habitat-lab's PointNavDatasetV1 strips this prefix from a scene_id before joining it to its ``scenes_dir``."""


def resolve_scene(scene_id: str, scenes_dir: str) -> str:
    """habitat-lab's PointNavDatasetV1 rule: a leading ``data/scene_datasets/`` is stripped, the rest joined to
    ``scenes_dir`` (an absolute scene_id stays as it is). So 'gibson/Adrian.glb' and
    'data/scene_datasets/gibson/Adrian.glb' both name ``{scenes_dir}/gibson/Adrian.glb``, whatever ``scenes_dir``."""
    if scene_id.startswith(DEFAULT_SCENE_PATH_PREFIX):
        scene_id = scene_id[len(DEFAULT_SCENE_PATH_PREFIX):]
    return os.path.join(scenes_dir, scene_id)


def gpu_device_id(configured: int, device, local_rank: int, cuda_devices: int | None = None) -> int:
    """The GPU that renders: ``sim.gpu_device_id`` when set (>= 0); else the trainer's CUDA device; else, on a
    machine with CUDA devices, the worker's local rank (habitat-baselines' choice, which is what torchrun and SLURM
    give one GPU per task); else -1, habitat-sim's "any EGL device": a machine without a GPU renders in software
    (Mesa's llvmpipe), and habitat-sim refuses a CUDA device number there ("unable to find CUDA device 0")."""
    if configured >= 0:
        return configured
    device = str(device)
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count()
    return local_rank % cuda_devices if cuda_devices > 0 else -1


def depth_observation(depth: np.ndarray, max_depth: float) -> np.ndarray:
    """Metres -> [0, 1] as habitat-lab's DepthSensor normalises: clipped to [0, max_depth], divided by it."""
    d = np.asarray(depth, np.float32)
    if d.ndim == 2:
        d = d[..., None]
    return np.clip(d, 0.0, max_depth) / max_depth


def rgb_observation(rgba: np.ndarray) -> np.ndarray:
    """habitat-sim's colour sensor gives RGBA: keep RGB, uint8."""
    return np.ascontiguousarray(np.asarray(rgba)[..., :3], dtype=np.uint8)


def worker_settings(sim_cfg, task_cfg, num_envs: int, seed: int, env_offset: int, device, local_rank: int
                    ) -> list[dict]:
    """The keyword settings of each env's HabitatSim (plain values: they travel to the worker processes)."""
    gpu = gpu_device_id(sim_cfg.gpu_device_id, device, local_rank)
    return [dict(resolution=int(sim_cfg.resolution), sensors=list(sim_cfg.sensors),
                 forward_step=float(sim_cfg.forward_step), turn_angle=float(sim_cfg.turn_angle),
                 max_depth=float(sim_cfg.max_depth), gpu_device_id=gpu, seed=int(seed) + env_offset + e,
                 scene_dataset_config=str(task_cfg.scene_dataset_config)) for e in range(num_envs)]


def agent_navmesh_settings(hs):
    """habitat-lab's ``default_agent_navmesh``: habitat-sim's defaults with the agent's radius and height (and
    habitat-lab's max_climb 0.2 m, max_slope 45°, static objects left out: its defaults, habitat-sim's too). The
    backend configures these, and scene export computes its navmeshes with them, so habitat-sim keeps a saved
    navmesh made with equal settings instead of rebuilding it."""
    settings = hs.NavMeshSettings()
    settings.set_defaults()
    settings.agent_radius, settings.agent_height = AGENT_RADIUS, AGENT_HEIGHT
    settings.agent_max_climb, settings.agent_max_slope = AGENT_MAX_CLIMB, AGENT_MAX_SLOPE
    settings.cell_height = NAVMESH_CELL_HEIGHT
    return settings


# ---------------------------------------------------------------------------------------- the simulator
class HabitatSim:
    """One ``habitat_sim.Simulator`` behind the worker protocol of ddppo.sim.worker_env (one per process)."""

    def __init__(self, resolution: int, sensors, forward_step: float, turn_angle: float, max_depth: float,
                 gpu_device_id: int, seed: int, scene_dataset_config: str = "default"):
        self.hs = require_habitat_sim()
        self.resolution, self.sensors = int(resolution), list(sensors)
        self.forward_step, self.turn_angle, self.max_depth = forward_step, turn_angle, max_depth
        self.gpu, self.seed, self.scene_dataset_config = gpu_device_id, seed, scene_dataset_config
        self.sim = self.agent = self.scene = self.goal = self._raw = self._follower = None

    def _sensor_spec(self, kind: str):
        hs = self.hs
        if hasattr(hs, "CameraSensorSpec"):  # habitat-sim >= 0.2.0
            spec = hs.CameraSensorSpec()
            spec.hfov = HFOV
            spec.sensor_subtype = hs.SensorSubType.PINHOLE
        else:  # older releases: the projection lives in the spec's string map
            spec = hs.SensorSpec()
            spec.parameters["hfov"] = str(HFOV)
        spec.uuid = kind
        spec.sensor_type = hs.SensorType.COLOR if kind == "rgb" else hs.SensorType.DEPTH
        spec.resolution = [self.resolution, self.resolution]
        spec.position = [0.0, SENSOR_HEIGHT, 0.0]
        return spec

    def _configuration(self, scene: str):
        hs = self.hs
        sim_cfg = hs.SimulatorConfiguration()
        sim_cfg.scene_id = scene
        if hasattr(sim_cfg, "scene_dataset_config_file"):
            sim_cfg.scene_dataset_config_file = self.scene_dataset_config
        sim_cfg.gpu_device_id = self.gpu
        sim_cfg.random_seed = self.seed
        sim_cfg.enable_physics = False  # kinematic navmesh motion, as PointNav
        sim_cfg.allow_sliding = True  # collisions slide along walls (docs/design.md, "Task semantics")
        if hasattr(sim_cfg, "navmesh_settings"):  # habitat-lab's default_agent_navmesh: habitat-sim recomputes
            sim_cfg.navmesh_settings = agent_navmesh_settings(self.hs)  # a scene's navmesh made with other settings
        actions = {name: hs.ActionSpec(name, hs.ActuationSpec(amount=amount)) for name, amount in (
            ("move_forward", self.forward_step), ("turn_left", self.turn_angle), ("turn_right", self.turn_angle))}
        agent = hs.AgentConfiguration(height=AGENT_HEIGHT, radius=AGENT_RADIUS, action_space=actions,
                                      sensor_specifications=[self._sensor_spec(k) for k in self.sensors])
        return hs.Configuration(sim_cfg, [agent])

    def _load(self, scene: str) -> None:
        hs = self.hs
        if not os.path.isfile(scene):
            raise FileNotFoundError(f"scene file {scene} does not exist (check task.scenes_dir)")
        cfg = self._configuration(scene)
        if self.sim is None:
            self.sim = hs.Simulator(cfg)
        else:
            self.sim.reconfigure(cfg)  # habitat-lab's way to change scene: keeps the GL context
        pathfinder, settings = self.sim.pathfinder, agent_navmesh_settings(self.hs)
        # habitat-sim applies the configured settings itself where it has SimulatorConfiguration.navmesh_settings;
        # older releases get the same rule here: no navmesh, or one made for another agent, is rebuilt
        shipped = getattr(pathfinder, "nav_mesh_settings", settings) if pathfinder.is_loaded else None
        if shipped != settings:
            self.sim.recompute_navmesh(pathfinder, settings)
        self.agent = self.sim.get_agent(0)
        self.scene, self._follower = scene, None

    def _geodesic(self, position) -> float:
        path = self.hs.ShortestPath()
        path.requested_start = np.asarray(position, np.float32)
        path.requested_end = self.goal
        found = self.sim.pathfinder.find_path(path)
        return float(path.geodesic_distance) if found else math.inf

    def _frame(self, collided: bool = False) -> dict:
        from habitat_sim.utils.common import quat_to_coeffs

        state = self.agent.get_state()
        obs = {}
        if "rgb" in self.sensors:
            obs["rgb"] = rgb_observation(self._raw["rgb"])
        if "depth" in self.sensors:
            obs["depth"] = depth_observation(self._raw["depth"], self.max_depth)
        position = [float(v) for v in state.position]
        rotation = [float(v) for v in quat_to_coeffs(state.rotation)]
        return {"obs": obs, "position": position, "heading": yaw_of_quaternion(rotation), "rotation": rotation,
                "collided": bool(collided), "geodesic": self._geodesic(position)}

    def place(self, scene: str, position, rotation, goal) -> dict:
        if scene != self.scene:
            self._load(scene)
        state = self.hs.AgentState()
        state.position = np.asarray(position, np.float32)
        state.rotation = [float(v) for v in rotation]  # [x, y, z, w] as a list: set_state converts it (0.2, 0.3)
        self.agent.set_state(state, reset_sensors=True)
        self.goal = np.asarray(goal, np.float32)
        self._raw = self.sim.get_sensor_observations()
        return self._frame()

    def step(self, action: int) -> dict:
        if action == STOP:
            return self._frame()  # STOP moves nothing: the last rendering stands
        self._raw = self.sim.step(ACTION_NAMES[int(action)])
        collided = self._raw.get("collided", getattr(self.sim, "previous_step_collided", False))
        return self._frame(collided)

    def oracle_action(self, stop_distance: float) -> int:
        """habitat-sim's GreedyGeodesicFollower along the navmesh's shortest path; STOP once within
        ``stop_distance`` or when no path exists."""
        from habitat_sim.errors import GreedyFollowerError

        if self._follower is None:
            self._follower = self.hs.nav.GreedyGeodesicFollower(self.sim.pathfinder, self.agent,
                                                                goal_radius=stop_distance, stop_key="stop")
        try:
            key = self._follower.next_action_along(self.goal)
        except GreedyFollowerError:
            return STOP
        return {v: k for k, v in ACTION_NAMES.items()}.get(key, STOP)

    def close(self) -> None:
        if self.sim is not None:
            self.sim.close()
            self.sim = None


# ---------------------------------------------------------------------------------------- the factory
def make_habitat_vector_env(cfg: TrainConfig, split: str, num_envs: int, *, seed: int = 0, env_offset: int = 0,
                            device="cpu", episode_ids: list[int] | None = None, order: str = "shuffle",
                            num_shares: int | None = None):
    """Habitat's PointNav: episodes from ``{task.data_dir}/{split}/{split}.json.gz`` (PointNavDatasetV1),
    scenes under ``task.scenes_dir``; one simulator process per environment."""
    from ddppo.distributed import ranks_from_env
    from ddppo.sim.dataset import load_episodes
    from ddppo.sim.dataset_dir import episodes_path
    from ddppo.sim.worker_env import WorkerVectorEnv

    episodes = load_episodes(episodes_path(cfg.task.data_dir, split))
    if episode_ids is not None:
        episodes = [episodes[k] for k in episode_ids]
    scenes_dir = cfg.task.scenes_dir
    missing = sorted({p for p in (resolve_scene(e.scene_id, scenes_dir) for e in episodes) if not Path(p).is_file()})
    if missing:
        raise FileNotFoundError(f"scene file {missing[0]} does not exist ({len(missing)} scene(s) of "
                                f"{episodes_path(cfg.task.data_dir, split)} missing; check task.scenes_dir)")
    require_habitat_sim()  # fail here, in one line, rather than in every worker
    _, local_rank, _ = ranks_from_env()
    settings = worker_settings(cfg.sim, cfg.task, num_envs, seed, env_offset, device, local_rank)
    return WorkerVectorEnv(episodes, num_envs, cfg.sim, cfg.task, HabitatSim, settings,
                           scene_of=lambda ep: resolve_scene(ep.scene_id, scenes_dir), seed=seed,
                           env_offset=env_offset, device=device, order=order, num_shares=num_shares)
