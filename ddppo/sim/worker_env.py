"""Batched PointNav over single-scene simulators that live in worker processes, one simulator per process: how
habitat-sim must run (one ``habitat_sim.Simulator`` per process and GL context).

The main process keeps everything task-level — episode streams, reward, success, SPL, the goal, GPS and compass
sensors — and computes it with the embedded backend's code (``ddppo.sim.task``, ``ddppo.sim.geometry``). A worker
only places its agent, applies actions, renders and measures geodesic distances. A worker simulator is a class,
importable by name, whose instances (built in the worker from keyword settings) have

    place(scene, position, rotation, goal) -> frame      start an episode (loading ``scene`` if it changed)
    step(action) -> frame                                 0 STOP (no motion), 1 forward, 2 left, 3 right
    oracle_action(stop_distance) -> int                   the next action of a shortest-path follower
    close()

and a frame is ``{"obs": {"rgb": uint8 [H, W, 3], "depth": float32 [H, W, 1] in [0, 1]}, "position": [x, y, z],
"heading": yaw in radians, "collided": bool, "geodesic": metres to the goal (inf when unreachable)}``, plus
optionally ``"rotation": [x, y, z, w]``, the simulator's own rotation: a resume puts it back as it was (rebuilt from
the heading, a quaternion differs in its last bits, and so would every later step and image).
``ddppo.sim.habitat_backend.HabitatSim`` is the habitat one; ``EmbeddedWorkerSim`` below runs the embedded
simulator behind the same protocol, which is how the protocol and this class are tested where habitat-sim is not.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from types import SimpleNamespace

import numpy as np
import torch

from ddppo.sim.dataset import Episode, check_episode_in_scene, scene_name
from ddppo.sim.env_base import BatchedPointNavEnv, StepResult
from ddppo.sim.episode_order import MAX_SCENE_REPEAT_STEPS, make_iterators
from ddppo.sim.geometry import STOP, episodic_gps, heading_to_quaternion, pointgoal_polar, wrap_angle
from ddppo.sim.task import episode_ends, pointnav_step


# ----------------------------------------------------------------------------------------------- worker side
def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def worker_main(conn, sim_class, settings: dict) -> None:
    """A worker's loop: build the simulator, then answer ``(method, args)`` with ``("ok", result)``. Any error is
    sent back as ``("error", one line)`` and ends the worker: a simulator in an unknown state is not reused."""
    sim = None
    try:
        sim = sim_class(**settings)
        conn.send(("ok", None))
        while True:
            method, args = conn.recv()
            if method == "close":
                break
            conn.send(("ok", getattr(sim, method)(*args)))
    except (KeyboardInterrupt, EOFError):
        pass  # the main process went away or was interrupted: just end
    except BaseException as e:
        try:
            conn.send(("error", _one_line(e)))
        except (OSError, EOFError):
            pass
    finally:
        if sim is not None:
            sim.close()
        conn.close()


class WorkerPool:
    """One process per simulator; ``call`` sends a command to several workers, then collects their answers, so
    they work in parallel."""

    def __init__(self, sim_class, settings: list[dict], start_method: str = "forkserver"):
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # the fork server imports this module (and torch) once; each worker then starts in milliseconds
            ctx.set_forkserver_preload([__name__])
        self.conns, self.procs = [], []
        try:
            for k, s in enumerate(settings):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=worker_main, args=(child, sim_class, s), daemon=True,
                                   name=f"ddppo-sim-{k}")
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
            for k in range(len(settings)):
                self._receive(k)
        except BaseException:
            self.close()
            raise

    def _died(self, k: int) -> RuntimeError:
        self.procs[k].join(timeout=5)
        return RuntimeError(f"simulator worker {k} (pid {self.procs[k].pid}) died (exit code {self.procs[k].exitcode})")

    def _receive(self, k: int):
        try:
            status, payload = self.conns[k].recv()
        except (EOFError, OSError):
            raise self._died(k) from None
        if status == "error":
            raise RuntimeError(f"simulator worker {k}: {payload}")
        return payload

    def call(self, workers: list[int], method: str, args: list[tuple]) -> list:
        for k, a in zip(workers, args):
            try:
                self.conns[k].send((method, a))
            except OSError:  # broken pipe: the worker is gone
                raise self._died(k) from None
        return [self._receive(k) for k in workers]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("close", ()))
            except (OSError, BrokenPipeError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []


# ----------------------------------------------------------------------------------------------- main side
class WorkerVectorEnv(BatchedPointNavEnv):
    """``num_envs`` PointNav environments, one worker simulator each, with PointNavVectorEnv's interface and
    semantics: automatic reset, ``final_obs``, the same ``info`` keys, episode streams and resume state.

    ``scene_of(episode)`` names the scene a worker loads for an episode (a file path for habitat);
    ``settings[e]`` are the keyword settings of env ``e``'s simulator. Training runs habitat-lab's episode order
    (``group_by_scene``, ddppo.sim.episode_order): the scenes split across the environments, the episodes of one
    scene in a row for up to ``max_scene_repeat_steps`` steps, since a worker loads a scene whenever its next
    episode is in another one (``scene_loads`` counts those loads).
    """

    _STATE = BatchedPointNavEnv._STATE + ("x", "y", "z", "theta", "rotation")

    def __init__(self, episodes: list[Episode], num_envs: int, sim_cfg, task_cfg, sim_class, settings: list[dict],
                 scene_of=lambda ep: scene_name(ep.scene_id), seed: int = 0, env_offset: int = 0,
                 device: str | torch.device = "cpu", order: str = "shuffle", num_shares: int | None = None,
                 start_method: str = "forkserver", group_by_scene: bool = True,
                 max_scene_repeat_steps: int = MAX_SCENE_REPEAT_STEPS):
        # the episode records on the CPU, where the workers' frames arrive
        super().__init__(episodes, num_envs, sim_cfg.resolution, sim_cfg.sensors, task_cfg, device, "cpu")
        if len(settings) != num_envs:
            raise ValueError(f"{len(settings)} simulator settings for {num_envs} environments")
        self.scene_of = scene_of
        scenes = sorted({scene_of(ep) for ep in episodes})
        index = {name: k for k, name in enumerate(scenes)}
        episode_scene = np.array([index[scene_of(ep)] for ep in episodes], np.int64)
        self.iterators = make_iterators(episode_scene, num_envs, seed, env_offset, order, num_shares, group_by_scene,
                                        max_scene_repeat_steps)
        self.scene_loads = 0
        """Episode starts that put a worker in another scene than its last one (each loads a scene there)."""
        self._worker_scene: list[str | None] = [None] * num_envs
        z = lambda: torch.zeros(num_envs)  # noqa: E731
        self.x, self.y, self.z, self.theta = z(), z(), z(), z()
        self.rotation = torch.zeros(num_envs, 4, dtype=torch.float64)
        self.goal_x, self.goal_y, self.goal_z = z(), z(), z()
        self._frames: list[dict | None] = [None] * num_envs
        self.pool = WorkerPool(sim_class, settings, start_method)

    @property
    def sim(self):
        """The agents' poses under the names the embedded simulator uses (``x``, ``z``, ``theta``, ``goal_x``,
        ``goal_z``), for code that reads ``envs.sim.x`` (evaluation's paths)."""
        return self

    # ------------------------------------------------------------------------------------------- frames
    def _take(self, envs: list[int], frames: list[dict]) -> None:
        """Record the workers' frames and the poses they report."""
        for e, f in zip(envs, frames):
            self._frames[e] = f
            self.x[e], self.y[e], self.z[e] = (float(v) for v in f["position"])
            self.theta[e] = math.remainder(float(f["heading"]), 2 * math.pi)  # (-pi, pi], as the embedded sim
            rotation = f.get("rotation") or heading_to_quaternion(float(f["heading"]))
            self.rotation[e] = torch.tensor([float(v) for v in rotation], dtype=torch.float64)

    def _place(self, envs: list[int], poses: list[tuple[list[float], list[float]]]) -> list[dict]:
        eps = [self.episodes[int(self.episode_index[e])] for e in envs]
        args = [(self.scene_of(ep), list(pos), list(rot), list(ep.goal_position)) for ep, (pos, rot) in zip(eps, poses)]
        for e, a in zip(envs, args):
            self.scene_loads += a[0] != self._worker_scene[e]
            self._worker_scene[e] = a[0]
        frames = self.pool.call(envs, "place", args)
        self._take(envs, frames)
        for e, ep in zip(envs, eps):
            self.goal_x[e], self.goal_y[e], self.goal_z[e] = ep.goal_position
        return frames

    def _start_episodes_untimed(self, env_ids: list[int]) -> list[int]:
        started, ks = self._next_episodes(env_ids)
        for e, k in zip(started, ks):
            self.episode_index[e] = k
        if started:
            eps = [self.episodes[int(self.episode_index[e])] for e in started]
            frames = self._place(started, [(ep.start_position, ep.start_rotation) for ep in eps])
            ids = torch.tensor(started)
            self.start_x[ids], self.start_z[ids], self.start_theta[ids] = self.x[ids], self.z[ids], self.theta[ids]
            d0 = torch.tensor([f["geodesic"] for f in frames], dtype=torch.float32)
            self.start_distance[ids], self.prev_distance[ids] = d0, d0
            self.path_length[ids], self.steps[ids], self.collisions[ids] = 0.0, 0, 0
        return started

    def _observe(self, env_ids: list[int] | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        ids = list(range(self.num_envs)) if env_ids is None else [int(e) for e in env_ids]
        idx = torch.tensor(ids, dtype=torch.long)
        obs = {}
        for key in ("rgb", "depth"):
            if key in self.sensors:
                obs[key] = torch.from_numpy(np.stack([self._frames[e]["obs"][key] for e in ids]))
        x, z, th = self.x[idx], self.z[idx], self.theta[idx]
        obs["pointgoal_with_gps_compass"] = pointgoal_polar(x, z, th, self.goal_x[idx], self.goal_z[idx])
        obs["gps"] = episodic_gps(x, z, self.start_x[idx], self.start_z[idx], self.start_theta[idx])
        obs["compass"] = wrap_angle(th - self.start_theta[idx])[:, None]
        return {k: v.to(self.device) for k, v in obs.items()}

    # ------------------------------------------------------------------------------------------- API
    def step(self, actions: torch.Tensor) -> StepResult:
        actions = torch.where(self.active, actions.detach().cpu().long().reshape(-1), STOP)
        was_active = self.active.clone()
        envs = was_active.nonzero().flatten().tolist()
        before = torch.stack([self.x, self.y, self.z], dim=1)
        self._take(envs, self.pool.call(envs, "step", [(int(actions[e]),) for e in envs]))
        self._count_step(was_active)
        moved = torch.linalg.vector_norm(torch.stack([self.x, self.y, self.z], dim=1) - before, dim=1)
        collided = torch.tensor([bool(f["collided"]) for f in self._frames]) & was_active
        distance = torch.tensor([f["geodesic"] for f in self._frames], dtype=torch.float32)
        self.steps += was_active.long()
        self.path_length += moved * was_active
        self.collisions += collided.long()
        stop = (actions == STOP) & was_active
        terminated, truncated = episode_ends(self.task, stop, was_active, self.steps)
        reward, metrics = pointnav_step(self.task, stop, was_active, self.prev_distance, distance,
                                        self.start_distance, self.path_length)
        self.prev_distance = distance
        return self._end_step(reward, terminated, truncated, metrics, collided)

    def oracle_actions(self) -> torch.Tensor:
        """Each env's next action along the shortest path (STOP within 0.75 x success distance of the goal)."""
        envs = self.active.nonzero().flatten().tolist()
        stop_distance = 0.75 * self.task.success_distance
        out = torch.full((self.num_envs,), STOP, dtype=torch.long)
        out[envs] = torch.tensor(self.pool.call(envs, "oracle_action", [(stop_distance,)] * len(envs)),
                                 dtype=torch.long)
        return out

    def _restore_poses(self, state: dict) -> None:
        # agents turn about y only, so (position, rotation) is their whole pose
        poses = [([float(self.x[e]), float(self.y[e]), float(self.z[e])], self.rotation[e].tolist())
                 for e in range(self.num_envs)]
        self._place(list(range(self.num_envs)), poses)

    def close(self) -> None:
        self.pool.close()


# ----------------------------------------------------------------------------------------------- embedded
class EmbeddedWorkerSim:
    """The embedded simulator (one env, one scene at a time) behind the worker protocol: the habitat backend's
    code path, end to end, on a machine without habitat-sim. Scenes are ``{scenes_dir}/{scene}.npz``, with the
    dataset's precomputed geodesic fields in ``{store_dir}/{scene}.npz`` when given (as PointNavVectorEnv reads
    them, so both give the same distances)."""

    def __init__(self, scenes_dir: str, store_dir: str = "", resolution: int = 64, sensors=("depth",),
                 kernels: str = "numba", forward_step: float = 0.25, turn_angle: float = 10.0,
                 max_depth: float = 10.0):
        torch.set_num_threads(1)  # one env per process: a thread pool per worker would only oversubscribe
        self.scenes_dir, self.store_dir = scenes_dir, store_dir
        self.args = dict(resolution=resolution, sensors=tuple(sensors), kernels=kernels, forward_step=forward_step,
                         turn_angle=turn_angle, max_depth=max_depth)
        self.scene, self.sim, self.nav = None, None, None
        self._obs = None
        from ddppo.sim.navmesh import GeodesicCache

        self.cache = GeodesicCache()

    def _load(self, scene: str) -> None:
        from pathlib import Path

        from ddppo.sim.batch_sim import BatchSimulator, SceneAtlas
        from ddppo.sim.navmesh import GeodesicStore, NavGrid
        from ddppo.sim.scene import load_scene

        store = GeodesicStore(Path(self.store_dir) / f"{scene}.npz") if self.store_dir else None
        self.nav = NavGrid(load_scene(Path(self.scenes_dir) / f"{scene}.npz"), store=store)
        self.sim = BatchSimulator(SceneAtlas([self.nav]), 1, **self.args)
        self.scene = scene

    def _frame(self, collided: bool = False) -> dict:
        sim = self.sim
        return {"obs": {k: v[0].numpy() for k, v in self._obs.items()},
                "position": [float(sim.x[0]), 0.0, float(sim.z[0])], "heading": float(sim.theta[0]),
                "collided": bool(collided), "geodesic": float(sim.geodesic()[0])}

    def place(self, scene: str, position, rotation, goal) -> dict:
        from ddppo.sim.geometry import quaternion_to_heading

        if scene != self.scene:
            self._load(scene)
        ep = Episode("", scene, tuple(position), tuple(rotation), tuple(goal), math.nan)
        check_episode_in_scene(ep, self.nav, "episode")
        field = self.cache.get(self.nav, goal[0], goal[2])
        self.sim.place(torch.tensor([0]), [0], [position[0]], [position[2]], [quaternion_to_heading(rotation)],
                       [field], [goal[0]], [goal[2]])
        self._obs = self.sim.render()
        return self._frame()

    def step(self, action: int) -> dict:
        if action == STOP:
            return self._frame()  # nothing moved: the last rendering stands
        collided, _ = self.sim.step(torch.tensor([action]))
        self._obs = self.sim.render()
        return self._frame(bool(collided[0]))

    def oracle_action(self, stop_distance: float) -> int:
        from ddppo.sim.oracle import ShortestPathFollower

        return int(ShortestPathFollower(SimpleNamespace(sim=self.sim), stop_distance=stop_distance).act()[0])

    def close(self) -> None:
        self.sim = None
