"""The embedded simulator's per-step kernels, in one home: every family has a compiled CPU implementation
(``numba_kernels``) and a vectorised torch one for any device (``torch_kernels``) with the same signature and the
same results (tests/test_render.py, test_kinematics.py and test_vector_env.py check that they agree; docs/design.md,
"Invariants"). :func:`select_kernels` picks one implementation of every family at once, from ``sim.kernels``.

The families:

- ``step``: habitat's discrete actions. A forward move is split into sub-steps no longer than a scene cell; a
  blocked sub-step's target is projected onto the boundary of the standing room (clearance interpolated between
  cell centres at least the agent radius), the closest point there, which is what habitat's navmesh ``try_step``
  keeps: the move slides along walls and round corners. Collisions by habitat-sim's rule: the step fell short
  (docs/design.md, "Kinematics").
- ``geodesic``: distance to the goal, bilinear over the finite neighbours in the goal's fast-marching field, and the
  straight-line distance within NEAR_GOAL of the goal, where interpolation would blunt the distance cone.
- ``render``: depth and RGB from a pinhole camera in the 2.5-D grid world. Each image column is one ray cast along
  the floor plan with an exact grid traversal (Amanatides & Woo), parameterised so that its parameter *is* the
  z-depth (the forward component of its direction is 1), which is what habitat's depth sensor reports. A column
  shows the wall where it is nearer than the floor (or ceiling) plane for that row, the plane elsewhere. The numba
  kernel runs in parallel over columns; the torch one skips empty space (a chessboard distance field lets a ray
  jump whole free squares).
- ``pose_sensors``: PointNav's goal, GPS and compass readings (``ddppo.sim.geometry``'s conventions).
- ``tally`` and ``pointnav_step``: PointNav's per-step bookkeeping, reward and metrics (``ddppo.sim.task``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ddppo.config import KernelChoice
from ddppo.sim.kernels import numba_kernels, torch_kernels

IMPLEMENTATIONS = {KernelChoice.numba: numba_kernels, KernelChoice.torch: torch_kernels}
"""``sim.kernels`` -> the module; ``auto`` is numba on the CPU, torch elsewhere."""


class StepKernel(Protocol):
    def __call__(self, atlas, scene_of, x, z, theta, actions, turn: float, forward_step: float,
                 substeps: int) -> tuple[Tensor, Tensor]:
        """Apply actions in place to the poses ``x``, ``z``, ``theta``; returns (collided, distance moved)."""


class GeodesicKernel(Protocol):
    def __call__(self, fields, rows, atlas, scene_of, x, z, goal_x, goal_z) -> Tensor:
        """Geodesic distance of each agent to its goal, from the fields ``fields[rows]``."""


class RenderKernel(Protocol):
    def __call__(self, atlas, scene_of, px, pz, theta, res: int, depth: Tensor | None, rgb: Tensor | None,
                 max_depth: float, sensor_h: float) -> None:
        """Write depth [N, res, res] (normalised by ``max_depth``) and RGB [N, res, res, 3] uint8 images."""


class PoseSensorsKernel(Protocol):
    def __call__(self, rows, x, z, theta, goal_x, goal_z, start_x, start_z, start_theta
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """(pointgoal_with_gps_compass [n, 2], gps [n, 2], compass [n, 1]) of the envs ``rows`` (all when None)."""


class TallyKernel(Protocol):
    def __call__(self, task, actions, was_active, collided, moved, steps, path_length, collisions
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Count the step into steps, path length and collisions (in place); returns (stop, terminated, truncated)."""


class PointNavStepKernel(Protocol):
    def __call__(self, task, stop, was_active, prev_distance, distance, start_distance, path_length
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """PointNav's reward and episode metrics of one step (``ddppo.sim.task.pointnav_step``)."""


@dataclass(frozen=True)
class Kernels:
    """One implementation of every kernel family. The numba ones take numpy views of CPU tensors (or the tensors),
    the torch ones tensors: :meth:`argument` hands each what it takes."""

    name: str
    step: StepKernel
    geodesic: GeodesicKernel
    render: RenderKernel
    pose_sensors: PoseSensorsKernel
    tally: TallyKernel
    pointnav_step: PointNavStepKernel

    def argument(self, host_views) -> Any:
        """How to pass a tensor to these kernels, given its owner's ``ddppo.numpy_views.HostViews``."""
        return host_views.kernel_arg(self.name)


def select_kernels(name: KernelChoice | str, device: torch.device | str) -> Kernels:
    """The kernels ``sim.kernels=name`` (validated with the config) picks for a simulator on ``device``; a one-line
    ValueError for numba off the CPU."""
    device = torch.device(device)
    if name == KernelChoice.auto:
        name = KernelChoice.numba if device.type == "cpu" else KernelChoice.torch
    if name == KernelChoice.numba and device.type != "cpu":
        raise ValueError(f"sim.kernels='numba' runs on the CPU only, not on {device}")
    module = IMPLEMENTATIONS[name]
    return Kernels(str(name), module.step, module.geodesic, module.render, module.pose_sensors, module.tally,
                   module.pointnav_step)
