"""The embedded simulator's per-step kernels as vectorised torch, for any device (the fast path on CUDA), one per
family, each the twin of the function of the same name in ``ddppo.sim.kernels.numba_kernels`` (the contract:
``ddppo.sim.kernels``). ``pointnav_step`` is PointNav's rule itself (``ddppo.sim.task``), which every backend runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddppo.sim.geometry import (
    MOVE_FORWARD,
    STOP,
    TURN_LEFT,
    TURN_RIGHT,
    episodic_gps,
    forward_xz,
    pointgoal_polar,
    wrap_angle,
)
from ddppo.sim.kernels.motion import (
    COLLISION_EPS,
    MAX_SLIDE_PUSH,
    MIN_GRADIENT2,
    SLIDE_ITERATIONS,
    STAND_TOLERANCE,
)
from ddppo.sim.kernels.shading import ATTENUATION, CEILING_RGB, CHECKER, SIDE_SHADE, STRIPE, UNDER_WALL_RGB
from ddppo.sim.navmesh import NEAR_GOAL
from ddppo.sim.task import episode_ends, pointnav_step

__all__ = ["cast_rays", "clearance", "geodesic", "pointnav_step", "pose_sensors", "render", "step", "tally"]


def clearance(atlas, scene_of, x, z) -> tuple[Tensor, Tensor, Tensor]:
    """The clearance at (x, z), interpolated bilinearly between cell centres (0 outside the scene), and its gradient
    (d/dx, d/dz): where the agent may stand and which way is away from the nearest geometry."""
    hm, wm = atlas.clearance.shape[1:]
    c = atlas.cell[scene_of]
    gx = (x - atlas.origin[scene_of, 0]) / c - 0.5
    gz = (z - atlas.origin[scene_of, 1]) / c - 0.5
    i0, j0 = torch.floor(gx), torch.floor(gz)
    fx, fz = gx - i0, gz - j0
    i0, j0 = i0.long(), j0.long()
    i = torch.stack([i0, i0 + 1, i0, i0 + 1])  # the four centres round (x, z): c00, c01, c10, c11
    j = torch.stack([j0, j0, j0 + 1, j0 + 1])
    inside = (i >= 0) & (i < wm) & (j >= 0) & (j < hm)
    flat = scene_of[None] * (hm * wm) + j.clamp(0, hm - 1) * wm + i.clamp(0, wm - 1)
    c00, c01, c10, c11 = torch.where(inside, atlas.clearance.reshape(-1)[flat], 0.0).to(x.dtype)
    near = c00 + fx * (c01 - c00)
    far = c10 + fx * (c11 - c10)
    value = near + fz * (far - near)
    d_dx = ((1 - fz) * (c01 - c00) + fz * (c11 - c10)) / c
    d_dz = (far - near) / c
    return value, d_dx, d_dz


def step(atlas, scene_of, x, z, theta, actions, turn, forward_step, substeps):
    """Habitat's discrete actions, in place on x, z, theta; returns (collided, distance moved)."""
    turning = (actions == TURN_LEFT).double() - (actions == TURN_RIGHT).double()
    theta.copy_(torch.where(turning != 0, wrap_angle(theta.double() + turning * turn), theta))
    moving = actions == MOVE_FORWARD
    # float64 from here to the stored pose, as the numba twin computes: the projection's Newton steps would
    # otherwise round apart by a few millimetres over a long walk
    fx, fz = forward_xz(theta.double())
    sub = forward_step / substeps
    dx = torch.where(moving, fx * sub, 0.0)
    dz = torch.where(moving, fz * sub, 0.0)
    radius = atlas.radius[scene_of].double()
    room = radius - STAND_TOLERANCE  # the clearance an agent may stand at
    x0, z0 = x.double(), z.double()
    px, pz = x0, z0
    for _ in range(substeps):
        tx, tz = px + dx, pz + dz
        c, gx, gz = clearance(atlas, scene_of, tx, tz)
        free = c >= room
        # blocked: the target projected onto the boundary (Newton steps along the clearance gradient), as habitat's
        # try_step keeps the closest point of the navmesh; a projection that does not land is no move
        sx, sz, stands = tx, tz, free
        for _ in range(SLIDE_ITERATIONS):
            g2 = gx * gx + gz * gz
            k = torch.where(stands | (g2 < MIN_GRADIENT2), 0.0, (radius - c) / g2.clamp_min(1e-12))
            sx, sz = sx + k * gx, sz + k * gz
            c, gx, gz = clearance(atlas, scene_of, sx, sz)
            stands = c >= room
        slides = ~free & stands & ((sx - tx) ** 2 + (sz - tz) ** 2 <= (MAX_SLIDE_PUSH * sub) ** 2)
        px = torch.where(free, tx, torch.where(slides, sx, px))
        pz = torch.where(free, tz, torch.where(slides, sz, pz))
    x.copy_(px)
    z.copy_(pz)
    moved2 = (x.double() - x0) ** 2 + (z.double() - z0) ** 2  # of the stored (float32) pose, as the twin
    collided = moving & (moved2 + COLLISION_EPS < forward_step * forward_step)
    return collided, torch.sqrt(moved2).float()


def geodesic(fields, rows, atlas, scene_of, x, z, goal_x, goal_z):
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


def cast_rays(atlas, scene_of, px, pz, dx, dz):
    """Exact first hit of rays p + t*d in their scenes. Returns t, side, hit colour index (all shape of px)."""
    dev = px.device
    n = px.shape[0]
    hm, wm = atlas.occ.shape[1:]
    c = atlas.cell[scene_of]
    gx = (px - atlas.origin[scene_of, 0]) / c
    gz = (pz - atlas.origin[scene_of, 1]) / c
    t = torch.zeros(n, device=dev, dtype=px.dtype)
    side = torch.zeros(n, device=dev, dtype=torch.long)
    idx = torch.arange(n, device=dev)
    flat = scene_of * (hm * wm)
    out_t, out_side = t.clone(), side.clone()
    prev_cell = torch.zeros(n, device=dev, dtype=torch.long)
    hit_cell = torch.full((n,), -1, device=dev, dtype=torch.long)
    tiny = 1e-30
    inv_dx = torch.where(dx.abs() > tiny, 1.0 / dx, torch.full_like(dx, 1e30))
    inv_dz = torch.where(dz.abs() > tiny, 1.0 / dz, torch.full_like(dz, 1e30))
    # active rays: (idx, t, i, j, side, prev) kept compact so finished rays cost nothing
    i = torch.floor(gx).long()
    j = torch.floor(gz).long()
    occ_flat = atlas.occ.reshape(-1)
    skip_flat = atlas.skip.reshape(-1)
    gxa, gza, dxa, dza, ida, ia, ja, flata = gx, gz, dx, dz, inv_dx, i, j, flat
    inv_da, idxa = inv_dz, idx
    ta, sidea, preva = t, side, i * 0
    for _ in range(hm + wm + 4):
        inside = (ia >= 0) & (ia < wm) & (ja >= 0) & (ja < hm)
        cell_id = flata + ja.clamp(0, hm - 1) * wm + ia.clamp(0, wm - 1)
        solid = ~inside | (occ_flat[cell_id] != 0)
        if solid.any():
            done = idxa[solid]
            out_t[done] = ta[solid]
            out_side[done] = sidea[solid]
            prev_cell[done] = preva[solid]
            hit_cell[done] = torch.where(inside[solid], cell_id[solid], torch.full_like(cell_id[solid], -1))
            keep = ~solid
            gxa, gza, dxa, dza, ida, inv_da = gxa[keep], gza[keep], dxa[keep], dza[keep], ida[keep], inv_da[keep]
            ia, ja, flata, idxa, ta, sidea, cell_id = ia[keep], ja[keep], flata[keep], idxa[keep], ta[keep], sidea[
                keep], cell_id[keep]
        if idxa.numel() == 0:
            break
        cs = c[idxa]
        preva = cell_id
        k = skip_flat[cell_id].to(ta.dtype)
        # jump (k - 1) whole cells in Euclidean distance when the chessboard field allows, else one exact DDA step
        speed = torch.sqrt(dxa * dxa + dza * dza)
        t_jump = ta + (k - 1).clamp(min=0) * cs / speed
        t_next_i = ((ia + (dxa > 0).long()).to(ta.dtype) - gxa) * cs * ida
        t_next_j = ((ja + (dza > 0).long()).to(ta.dtype) - gza) * cs * inv_da
        # a ray parallel to an axis never crosses that axis' cell boundaries
        t_next_i = torch.where(dxa == 0, math.inf, t_next_i)
        t_next_j = torch.where(dza == 0, math.inf, t_next_j)
        cross_i = t_next_i < t_next_j
        t_step = torch.where(cross_i, t_next_i, t_next_j)
        jump = k >= 2
        ta = torch.where(jump, t_jump, t_step)
        sidea = torch.where(jump, sidea, torch.where(cross_i, 0, 1))
        # after a jump the cell comes from the position; after a step it is the neighbour across the boundary
        x_now = gxa + ta * dxa / cs
        z_now = gza + ta * dza / cs
        ia = torch.where(jump, torch.floor(x_now).long(), ia + torch.where(cross_i, torch.sign(dxa).long(), 0))
        ja = torch.where(jump, torch.floor(z_now).long(), ja + torch.where(cross_i, 0, torch.sign(dza).long()))
    return out_t, out_side, prev_cell, hit_cell


def render(atlas, scene_of, px, pz, theta, res, depth, rgb, max_depth, sensor_h):
    n = px.shape[0]
    dev = px.device
    f = res / 2.0
    xc = (torch.arange(res, device=dev, dtype=px.dtype) + 0.5 - res / 2.0) / f
    sn, cs = torch.sin(theta)[:, None], torch.cos(theta)[:, None]
    dx = (-sn + xc[None] * cs).reshape(-1)
    dz = (-cs - xc[None] * sn).reshape(-1)
    rep = lambda v: v[:, None].expand(n, res).reshape(-1)  # noqa: E731
    s = rep(scene_of)
    t, side, prev, hit = cast_rays(atlas, s, rep(px), rep(pz), dx, dz)
    yc = (res / 2.0 - (torch.arange(res, device=dev, dtype=px.dtype) + 0.5)) / f
    ceil = atlas.ceiling[scene_of][:, None]
    plane = torch.where(yc[None] < 0, sensor_h / -yc[None], (ceil - sensor_h) / yc[None])  # [n, rows]
    plane = torch.where(yc[None] == 0, torch.full_like(plane, 1e30), plane)
    t2 = t.reshape(n, 1, res)
    is_wall = t2 <= plane[:, :, None]  # [n, rows, cols]
    d = torch.where(is_wall, t2, plane[:, :, None])
    if depth is not None:
        depth.copy_(d.clamp(max=max_depth) / max_depth)
    if rgb is None:
        return
    cidx = atlas.cidx.reshape(-1)
    occ = atlas.occ.reshape(-1)
    hit_obj = (hit >= 0) & (occ[hit.clamp(min=0)] == 2)
    wall_color = torch.where(hit_obj, cidx[hit.clamp(min=0)], cidx[prev] + 1)
    wall_color = torch.where(~hit_obj & (cidx[prev] < 0), -1, wall_color)
    u = torch.where(side == 0, rep(pz) + t * dz, rep(px) + t * dx)
    stripe = 0.88 + 0.12 * (torch.floor(u * STRIPE).long() & 1).to(t.dtype)
    shade = torch.where(side == 0, SIDE_SHADE[0], SIDE_SHADE[1])
    wall_gain = (stripe * shade / (1.0 + ATTENUATION * t)).reshape(n, 1, res, 1)
    pal = torch.cat([atlas.palette.to(t.dtype), torch.full((1, 3), UNDER_WALL_RGB, device=dev)])
    wall_rgb = pal[wall_color].reshape(n, 1, res, 3) * wall_gain
    # floor and ceiling
    dxg, dzg = dx.reshape(n, 1, res), dz.reshape(n, 1, res)
    wx = px[:, None, None] + d * dxg
    wz = pz[:, None, None] + d * dzg
    cell = atlas.cell[scene_of][:, None, None]
    fi = torch.floor((wx - atlas.origin[scene_of, 0][:, None, None]) / cell).long()
    fj = torch.floor((wz - atlas.origin[scene_of, 1][:, None, None]) / cell).long()
    hm, wm = atlas.occ.shape[1:]
    ok = (fi >= 0) & (fi < wm) & (fj >= 0) & (fj < hm)
    fid = scene_of[:, None, None] * hm * wm + fj.clamp(0, hm - 1) * wm + fi.clamp(0, wm - 1)
    floor_c = torch.where(ok & (occ[fid] == 0), cidx[fid], -1)
    checker = 0.85 + 0.15 * ((torch.floor(wx * CHECKER).long() + torch.floor(wz * CHECKER).long()) & 1).to(t.dtype)
    floor_rgb = pal[floor_c] * (checker / (1.0 + ATTENUATION * d))[..., None]
    ceil_rgb = torch.tensor(CEILING_RGB, device=dev) * (1.0 / (1.0 + ATTENUATION * d))[..., None]
    plane_rgb = torch.where((yc[None, :, None] > 0)[..., None], ceil_rgb, floor_rgb)
    img = torch.where(is_wall[..., None], wall_rgb.expand_as(plane_rgb), plane_rgb)
    # uint8 conversion truncates like the numba kernel's float-to-int store
    rgb.copy_(img.clamp(max=255.0).to(torch.uint8))


def pose_sensors(rows, x, z, theta, goal_x, goal_z, start_x, start_z, start_theta
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pointgoal_with_gps_compass [n, 2], gps [n, 2], compass [n, 1]) of the envs ``rows`` (all when None)."""
    sl = slice(None) if rows is None else rows
    x, z, th, th0 = x[sl], z[sl], theta[sl], start_theta[sl]
    return (pointgoal_polar(x, z, th, goal_x[sl], goal_z[sl]), episodic_gps(x, z, start_x[sl], start_z[sl], th0),
            wrap_angle(th - th0)[:, None])


def tally(task, actions, was_active, collided, moved, steps, path_length, collisions
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count the step taken into the episode's steps, path length and collisions (in place; ``collided`` only
    where active); returns (stop, terminated, truncated). ``actions`` are STOP for inactive envs."""
    collided &= was_active
    steps += was_active.long()
    path_length += moved
    collisions += collided.long()
    stop = (actions == STOP) & was_active
    return (stop, *episode_ends(task, stop, was_active, steps))
