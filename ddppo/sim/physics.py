"""Habitat's discrete actions (turns, forward moves with sliding collisions) and geodesic look-ups: a compiled CPU
kernel and a torch twin of each.

A forward move is split into sub-steps no longer than a scene cell; a blocked sub-step keeps whichever axis
component stays navigable (the larger one when both do). Against axis-aligned walls that is the projection of the
motion onto the wall, which is what habitat's navmesh ``try_step`` does. tests/test_kinematics.py checks
the twins agree.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ddppo.rows import as_numpy
from ddppo.sim.geometry import MOVE_FORWARD, TURN_LEFT, TURN_RIGHT, forward_xz, wrap_angle
from ddppo.sim.navmesh import NEAR_GOAL


@numba.njit(cache=True, inline="always")
def _nav(nav, s, origin, cell, x, z):
    i = int(math.floor((x - origin[s, 0]) / cell[s]))
    j = int(math.floor((z - origin[s, 1]) / cell[s]))
    if j < 0 or j >= nav.shape[1] or i < 0 or i >= nav.shape[2]:
        return False
    return nav[s, j, i]


@numba.njit(cache=True)
def _step_numba(nav, origin, cell, scene_of, actions, x, z, theta, turn, sub, substeps, collided, moved):
    for n in range(x.shape[0]):
        a = actions[n]
        if a == TURN_LEFT or a == TURN_RIGHT:
            th = theta[n] + (turn if a == TURN_LEFT else -turn)
            theta[n] = (th + math.pi) % (2 * math.pi) - math.pi
        if a != MOVE_FORWARD:
            continue
        s = scene_of[n]
        dx, dz = -math.sin(theta[n]) * sub, -math.cos(theta[n]) * sub
        x0, z0 = x[n], z[n]
        px, pz = x0, z0
        for _ in range(substeps):
            if _nav(nav, s, origin, cell, px + dx, pz + dz):
                px += dx
                pz += dz
                continue
            collided[n] = True
            ok_x = _nav(nav, s, origin, cell, px + dx, pz)
            ok_z = _nav(nav, s, origin, cell, px, pz + dz)
            if ok_x and (abs(dx) >= abs(dz) or not ok_z):
                px += dx
            elif ok_z:
                pz += dz
        x[n], z[n] = px, pz
        moved[n] = math.hypot(x[n] - x0, z[n] - z0)


def step_numba(atlas, scene_of, x, z, theta, actions, turn, forward_step, substeps):
    """Habitat's discrete actions, in place on CPU tensors x, z, theta; returns (collided, distance moved)."""
    collided = np.zeros(x.shape[0], np.bool_)
    moved = np.zeros(x.shape[0], np.float32)
    v = atlas.host.view
    _step_numba(v(atlas.navigable), v(atlas.origin), v(atlas.cell), as_numpy(scene_of), as_numpy(actions),
                as_numpy(x), as_numpy(z), as_numpy(theta), turn, forward_step / substeps, substeps, collided, moved)
    return torch.from_numpy(collided), torch.from_numpy(moved)


def navigable_torch(atlas, scene_of, x, z):
    hm, wm = atlas.navigable.shape[1:]
    c = atlas.cell[scene_of]
    i = torch.floor((x - atlas.origin[scene_of, 0]) / c).long()
    j = torch.floor((z - atlas.origin[scene_of, 1]) / c).long()
    inside = (i >= 0) & (i < wm) & (j >= 0) & (j < hm)
    flat = scene_of * (hm * wm) + j.clamp(0, hm - 1) * wm + i.clamp(0, wm - 1)
    return inside & atlas.navigable.reshape(-1)[flat]


def step_torch(atlas, scene_of, x, z, theta, actions, turn, forward_step, substeps):
    """The twin of ``step_numba`` for any device."""
    turning = (actions == TURN_LEFT).float() - (actions == TURN_RIGHT).float()
    theta.copy_(torch.where(turning != 0, wrap_angle(theta + turning * turn), theta))
    moving = actions == MOVE_FORWARD
    fx, fz = forward_xz(theta)
    sub = forward_step / substeps
    dx = torch.where(moving, fx * sub, 0.0)
    dz = torch.where(moving, fz * sub, 0.0)
    n = x.shape[0]
    collided = torch.zeros(n, dtype=torch.bool, device=x.device)
    s3 = scene_of.repeat(3)
    px, pz = x.clone(), z.clone()
    for _ in range(substeps):
        # the full move and both axis slides in one gather
        ok, ok_x, ok_z = navigable_torch(atlas, s3, torch.cat([px + dx, px + dx, px]),
                                         torch.cat([pz + dz, pz, pz + dz])).view(3, n)
        slide_x = ~ok & ok_x & ((dx.abs() >= dz.abs()) | ~ok_z)
        slide_z = ~ok & ok_z & ~slide_x
        px = torch.where(ok | slide_x, px + dx, px)
        pz = torch.where(ok | slide_z, pz + dz, pz)
        collided |= moving & ~ok
    moved = torch.sqrt((px - x) ** 2 + (pz - z) ** 2)
    x.copy_(px)
    z.copy_(pz)
    return collided, moved


@numba.njit(cache=True)
def _geodesic_numba(fields, rows, origin, cell, scene_of, x, z, goal_x, goal_z, near, out):
    gh, gw = fields.shape[1], fields.shape[2]
    for n in range(x.shape[0]):
        s = scene_of[n]
        gx = (x[n] - origin[s, 0]) / cell[s] - 0.5
        gz = (z[n] - origin[s, 1]) / cell[s] - 0.5
        i0 = int(math.floor(gx))
        j0 = int(math.floor(gz))
        fx, fz = gx - i0, gz - j0
        num = 0.0
        den = 0.0
        for dj in range(2):
            for di in range(2):
                w = (fz if dj else 1.0 - fz) * (fx if di else 1.0 - fx)
                jj = min(max(j0 + dj, 0), gh - 1)
                ii = min(max(i0 + di, 0), gw - 1)
                v = fields[rows[n], jj, ii]
                if math.isfinite(v):
                    num += v * w
                    den += w
        out[n] = num / den if den > 1e-9 else np.inf
        euclid = math.hypot(x[n] - goal_x[n], z[n] - goal_z[n])
        if euclid < near:
            out[n] = euclid


def geodesic_numba(fields, rows, atlas, scene_of, x, z, goal_x, goal_z):
    out = np.empty(x.shape[0], np.float32)
    v = atlas.host.view
    _geodesic_numba(as_numpy(fields), as_numpy(rows), v(atlas.origin), v(atlas.geo_cell), as_numpy(scene_of),
                    as_numpy(x), as_numpy(z), as_numpy(goal_x), as_numpy(goal_z), NEAR_GOAL, out)
    return torch.from_numpy(out)


def geodesic_torch(fields, rows, atlas, scene_of, x, z, goal_x, goal_z):
    """Bilinear interpolation over the finite neighbours of each agent's FMM grid (``fields[rows]``); the
    straight-line distance within NEAR_GOAL of the goal, where interpolation would blunt the distance cone."""
    c = atlas.geo_cell[scene_of]
    gx = (x - atlas.origin[scene_of, 0]) / c - 0.5
    gz = (z - atlas.origin[scene_of, 1]) / c - 0.5
    i0, j0 = torch.floor(gx).long(), torch.floor(gz).long()
    fx, fz = gx - i0, gz - j0
    gh, gw = fields.shape[1:]
    flat = fields.reshape(fields.shape[0], -1)
    num = torch.zeros_like(gx)
    den = torch.zeros_like(gx)
    for dj, di, wt in ((0, 0, (1 - fz) * (1 - fx)), (0, 1, (1 - fz) * fx), (1, 0, fz * (1 - fx)), (1, 1, fz * fx)):
        v = flat[rows, (j0 + dj).clamp(0, gh - 1) * gw + (i0 + di).clamp(0, gw - 1)]
        ok = torch.isfinite(v)
        num += torch.where(ok, v * wt, 0.0)
        den += torch.where(ok, wt, 0.0)
    out = torch.where(den > 1e-9, num / den.clamp(min=1e-9), math.inf)
    euclid = torch.hypot(x - goal_x, z - goal_z)
    return torch.where(euclid < NEAR_GOAL, euclid, out)


STEPPERS = {"numba": step_numba, "torch": step_torch}
GEODESICS = {"numba": geodesic_numba, "torch": geodesic_torch}
