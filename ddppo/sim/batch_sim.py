"""N agents in N (possibly different) scenes, held as tensors on one device: kinematics, sensors, geodesics."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from ddppo.numpy_views import HostViews
from ddppo.sim.kernels import select_kernels
from ddppo.sim.navmesh import SENSOR_HEIGHT, NavGrid
from ddppo.sim.scene import FREE, OBJECT, WALL


class SceneAtlas:
    """Every loaded scene packed into padded tensors, so one kernel call serves a batch spread over scenes."""

    def __init__(self, navs: list[NavGrid], device: torch.device | str = "cpu"):
        if not navs:
            raise ValueError("no scene to load")
        self.navs = navs
        self.names = [n.scene.name for n in navs]
        self.index = {name: k for k, name in enumerate(self.names)}
        hm = max(n.scene.shape[0] for n in navs)
        wm = max(n.scene.shape[1] for n in navs)
        ghm = max(n.coarse_navigable.shape[0] for n in navs)
        gwm = max(n.coarse_navigable.shape[1] for n in navs)
        S = len(navs)
        occ = np.full((S, hm, wm), WALL, np.uint8)
        cidx = np.full((S, hm, wm), -1, np.int32)
        nav = np.zeros((S, hm, wm), bool)
        clear = np.zeros((S, hm, wm), np.float32)
        skip = np.zeros((S, hm, wm), np.int32)
        palette = []
        base = 0
        for s, ng in enumerate(navs):
            sc = ng.scene
            h, w = sc.shape
            occ[s, :h, :w] = sc.occupancy
            nav[s, :h, :w] = ng.navigable
            clear[s, :h, :w] = ng.clearance
            # palette: [floor, wall] per room, then object colours
            rooms = len(sc.room_colors)
            free = sc.occupancy == FREE
            obj = sc.occupancy == OBJECT
            cidx[s, :h, :w][free] = base + 2 * sc.material[free]
            cidx[s, :h, :w][obj] = base + 2 * rooms + sc.material[obj]
            palette += [sc.room_colors.reshape(-1, 3), sc.object_colors.reshape(-1, 3)]
            base += 2 * rooms + len(sc.object_colors)
            skip[s] = ndimage.distance_transform_cdt(occ[s] == FREE, metric="chessboard")
        self.geo_shape = (ghm, gwm)
        self.device = torch.device(device)
        t = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        self.occ, self.cidx, self.navigable, self.skip = t(occ), t(cidx), t(nav), t(skip)
        self.clearance = t(clear)
        """metres from each cell centre to geometry; the agent stands where its bilinear interpolation >= radius"""
        self.radius = t(np.array([n.agent_radius for n in navs], np.float32))
        self.palette = t(np.concatenate(palette).astype(np.uint8))
        self.origin = t(np.array([n.scene.origin for n in navs], np.float32))
        self.cell = t(np.array([n.scene.cell_size for n in navs], np.float32))
        self.geo_cell = t(np.array([n.geodesic_cell for n in navs], np.float32))
        self.ceiling = t(np.array([n.scene.ceiling_height for n in navs], np.float32))
        self.host = HostViews(self.occ, self.cidx, self.navigable, self.skip, self.palette, self.origin, self.cell,
                              self.geo_cell, self.ceiling, self.clearance, self.radius)
        """numpy views of the tables, for the numba kernels (empty off the CPU)"""


class BatchSimulator:
    """Agents as tensors; ``step`` applies habitat's discrete actions with sliding collisions (ddppo.sim.kernels).

    The agent is a disc of ``NavGrid.agent_radius`` (habitat's 0.1 m): it stands where the clearance interpolated
    between cell centres is at least that (``NavGrid``). ``kernels`` picks the implementation of every kernel:
    numba (CPU), torch (any device) or auto (``ddppo.sim.kernels.select_kernels``).
    """

    def __init__(self, atlas: SceneAtlas, num_envs: int, resolution: int = 64, sensors=("depth",),
                 kernels: str = "auto", forward_step: float = 0.25, turn_angle: float = 10.0,
                 max_depth: float = 10.0):
        bad = set(sensors) - {"depth", "rgb"}
        if bad:
            raise ValueError(f"sensors: unknown sensor(s) {sorted(bad)}; choose from ['depth', 'rgb']")
        self.atlas = atlas
        self.device = atlas.device
        self.num_envs = num_envs
        self.resolution = int(resolution)
        self.sensors = tuple(sensors)
        self.kernels = select_kernels(kernels, self.device)
        """Which implementation of every per-step kernel runs: the environment's own follow suit."""
        self.forward_step = forward_step
        self.turn = math.radians(turn_angle)
        self.max_depth = max_depth
        self.substeps = max(1, math.ceil(forward_step / float(atlas.cell.min())))
        z = lambda dt=torch.float32: torch.zeros(num_envs, device=self.device, dtype=dt)  # noqa: E731
        self.scene_of = z(torch.long)
        self.x, self.z, self.theta = z(), z(), z()
        self.goal_x, self.goal_z = z(), z()
        self.fields = torch.full((num_envs, *atlas.geo_shape), math.inf, device=self.device)
        self.all_envs = torch.arange(num_envs, device=self.device)
        self.host = HostViews(self.scene_of, self.x, self.z, self.theta, self.goal_x, self.goal_z, self.fields,
                              self.all_envs)
        # the numba kernels take the state as numpy views made once (a step passes dozens of tensors, and
        # Tensor.numpy() itself costs more than a small kernel's work), the torch ones the tensors themselves
        self.kernel_arg = self.kernels.argument(self.host)

    # ----------------------------------------------------------------------------------------------- state
    def place(self, env_ids, scene_idx, x, z, theta, fields: list[np.ndarray], goal_x=None, goal_z=None):
        """Put agents ``env_ids`` (a list or tensor) at poses and give each its goal's geodesic field (and the goal,
        without which distances near it come from the field alone)."""
        env_ids = env_ids.tolist() if isinstance(env_ids, torch.Tensor) else list(env_ids)
        nan = [math.nan] * len(env_ids)
        self.host.put(self.goal_x, env_ids, nan if goal_x is None else goal_x)
        self.host.put(self.goal_z, env_ids, nan if goal_z is None else goal_z)
        for dst, values in ((self.scene_of, scene_idx), (self.x, x), (self.z, z), (self.theta, theta)):
            self.host.put(dst, env_ids, values)
        if self.device.type == "cpu":
            # numpy on CPU: torch would hand these large copies to its (passively waiting) thread pool
            target = self.host.view(self.fields)
            for k, f in zip(env_ids, fields):
                target[k, : f.shape[0], : f.shape[1]] = f
                target[k, f.shape[0]:, :] = math.inf
                target[k, : f.shape[0], f.shape[1]:] = math.inf
        else:
            for k, f in zip(env_ids, fields):
                self.fields[k].fill_(math.inf)
                self.fields[k, : f.shape[0], : f.shape[1]] = torch.from_numpy(f).to(self.device)

    # -------------------------------------------------------------------------------------------- dynamics
    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply actions (0 STOP, 1 FORWARD, 2 LEFT, 3 RIGHT). Returns (collided, distance moved)."""
        a = self.kernel_arg
        return self.kernels.step(self.atlas, a(self.scene_of), a(self.x), a(self.z), a(self.theta),
                                 actions.to(self.device), self.turn, self.forward_step, self.substeps)

    # ------------------------------------------------------------------------------------------ perception
    def render(self, env_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if env_ids is None:
            s, x, z, th = map(self.kernel_arg, (self.scene_of, self.x, self.z, self.theta))
        else:
            s, x, z, th = self.scene_of[env_ids], self.x[env_ids], self.z[env_ids], self.theta[env_ids]
        n, r = s.shape[0], self.resolution
        out = {}
        depth = rgb = None
        if "depth" in self.sensors:
            depth = out["depth"] = torch.empty((n, r, r, 1), device=self.device)
        if "rgb" in self.sensors:
            rgb = out["rgb"] = torch.empty((n, r, r, 3), device=self.device, dtype=torch.uint8)
        d = depth.view(n, r, r) if depth is not None else None
        self.kernels.render(self.atlas, s, x, z, th, r, d, rgb, self.max_depth, SENSOR_HEIGHT)
        return out

    def geodesic(self, env_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Geodesic distance from each agent to its goal."""
        a = self.kernel_arg
        state = (self.scene_of, self.x, self.z, self.goal_x, self.goal_z)
        # all envs (every step) without gathers
        rows, state = (self.all_envs, state) if env_ids is None else (env_ids, [v[env_ids] for v in state])
        return self.kernels.geodesic(a(self.fields), a(rows), self.atlas, *map(a, state)).to(self.device)
