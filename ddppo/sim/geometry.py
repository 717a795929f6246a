"""Habitat's coordinate conventions for a flat-floor agent.

y is up and the agent looks along -z. A heading ``theta`` is a rotation about +y, so turning left increases it.
Rotations are exchanged as quaternions ``[x, y, z, w]`` (habitat's dataset order).
"""

from __future__ import annotations

import math

import torch

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
