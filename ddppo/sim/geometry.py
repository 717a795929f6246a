"""Habitat's coordinate conventions for a flat-floor agent.

y is up and the agent looks along -z. A heading ``theta`` is a rotation about +y, so turning left increases it.
Rotations are exchanged as quaternions ``[x, y, z, w]`` (habitat's dataset order).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ddppo.rows import as_numpy

ACTION_NAMES = ("STOP", "MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT")
STOP, MOVE_FORWARD, TURN_LEFT, TURN_RIGHT = range(4)


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    """Wrap to (-pi, pi]."""
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi


def forward_xz(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World-frame (x, z) components of the viewing direction R(theta) @ (0, 0, -1)."""
    return -torch.sin(theta), -torch.cos(theta)


def heading_to_quaternion(theta: float) -> list[float]:
    return [0.0, math.sin(theta / 2), 0.0, math.cos(theta / 2)]


def quaternion_to_heading(q) -> float:
    """Heading about +y of quaternion [x, y, z, w]; raises if the rotation is not (close to) about y alone."""
    x, y, z, w = (float(v) for v in q)
    norm = math.sqrt(x * x + y * y + z * z + w * w)
    if not math.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"rotation {list(q)} is not a unit quaternion")
    x, y, z, w = x / norm, y / norm, z / norm, w / norm
    if abs(x) > 1e-3 or abs(z) > 1e-3:
        raise ValueError(f"rotation {list(q)} is not a rotation about the y axis")
    return 2.0 * math.atan2(y, w)


def world_to_agent_xz(
    dx: torch.Tensor, dz: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate a world-frame (x, z) vector into the agent frame: R(theta)^-1 @ v."""
    c, s = torch.cos(theta), torch.sin(theta)
    return dx * c - dz * s, dx * s + dz * c


def pointgoal_polar(
    pos_x: torch.Tensor, pos_z: torch.Tensor, theta: torch.Tensor, goal_x: torch.Tensor, goal_z: torch.Tensor
) -> torch.Tensor:
    """Habitat's ``pointgoal_with_gps_compass``: [rho, -phi] with phi = atan2(d_x, -d_z) in the agent frame.

    A goal straight ahead gives phi = 0; a goal to the left gives a positive second component.
    """
    ax, az = world_to_agent_xz(goal_x - pos_x, goal_z - pos_z, theta)
    rho = torch.sqrt(ax * ax + az * az)
    phi = torch.atan2(ax, -az)
    return torch.stack([rho, -phi], dim=-1)


def episodic_gps(
    pos_x: torch.Tensor, pos_z: torch.Tensor, start_x: torch.Tensor, start_z: torch.Tensor, start_theta: torch.Tensor
) -> torch.Tensor:
    """Habitat's 2-D EpisodicGPSSensor: position in the start frame as [-z, x]."""
    ax, az = world_to_agent_xz(pos_x - start_x, pos_z - start_z, start_theta)
    return torch.stack([-az, ax], dim=-1)


def pose_sensors_torch(rows, x, z, theta, goal_x, goal_z, start_x, start_z, start_theta
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pointgoal_with_gps_compass [n, 2], gps [n, 2], compass [n, 1]) of the envs ``rows`` (all when None)."""
    sl = slice(None) if rows is None else rows
    x, z, th, th0 = x[sl], z[sl], theta[sl], start_theta[sl]
    return (pointgoal_polar(x, z, th, goal_x[sl], goal_z[sl]), episodic_gps(x, z, start_x[sl], start_z[sl], th0),
            wrap_angle(th - th0)[:, None])


@numba.njit(cache=True, error_model="numpy")
def _pose_sensors_numba(rows, x, z, theta, goal_x, goal_z, start_x, start_z, start_theta, pointgoal, gps, compass):
    for k in range(rows.shape[0]):
        n = rows[k]
        c, s = math.cos(theta[n]), math.sin(theta[n])
        dx, dz = goal_x[n] - x[n], goal_z[n] - z[n]
        ax, az = dx * c - dz * s, dx * s + dz * c
        pointgoal[k, 0] = math.sqrt(ax * ax + az * az)
        pointgoal[k, 1] = -math.atan2(ax, -az)
        c, s = math.cos(start_theta[n]), math.sin(start_theta[n])
        dx, dz = x[n] - start_x[n], z[n] - start_z[n]
        gps[k, 0] = -(dx * s + dz * c)
        gps[k, 1] = dx * c - dz * s
        compass[k, 0] = (theta[n] - start_theta[n] + math.pi) % (2 * math.pi) - math.pi


def pose_sensors_numba(rows, x, z, theta, goal_x, goal_z, start_x, start_z, start_theta):
    """The twin of ``pose_sensors_torch`` on CPU tensors (or their numpy views), in one pass."""
    rows = np.arange(x.shape[0]) if rows is None else as_numpy(rows)
    n = rows.shape[0]
    pointgoal, gps, compass = np.empty((n, 2), np.float32), np.empty((n, 2), np.float32), np.empty((n, 1), np.float32)
    _pose_sensors_numba(rows, *map(as_numpy, (x, z, theta, goal_x, goal_z, start_x, start_z, start_theta)),
                        pointgoal, gps, compass)
    return torch.from_numpy(pointgoal), torch.from_numpy(gps), torch.from_numpy(compass)


POSE_SENSORS = {"numba": pose_sensors_numba, "torch": pose_sensors_torch}
