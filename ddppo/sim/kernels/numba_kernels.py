"""The embedded simulator's per-step kernels compiled for the CPU (numba), one per family, each the twin of the
function of the same name in ``ddppo.sim.kernels.torch_kernels`` (the contract: ``ddppo.sim.kernels``).

The wrappers take CPU tensors or their numpy views (``ddppo.numpy_views.HostViews``) and return tensors; the
``_``-prefixed functions are the compiled loops. One compiled pass over the batch replaces dozens of small tensor
operations, each of which costs more in dispatch than in work on a few dozen environments.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ddppo.numpy_views import as_numpy
from ddppo.sim.geometry import MOVE_FORWARD, STOP, TURN_LEFT, TURN_RIGHT
from ddppo.sim.kernels.motion import (
    COLLISION_EPS,
    MAX_SLIDE_PUSH,
    MIN_GRADIENT2,
    SLIDE_ITERATIONS,
    STAND_TOLERANCE,
)
from ddppo.sim.kernels.shading import ATTENUATION, CEILING_RGB, CHECKER, SIDE_SHADE, STRIPE, UNDER_WALL_RGB
from ddppo.sim.navmesh import NEAR_GOAL


@numba.njit(cache=True, inline="always")
def _clearance(clear, s, origin, cell, x, z):
    """The clearance at (x, z) interpolated between cell centres and its gradient (the twin's ``clearance``)."""
    c = cell[s]
    gx = (x - origin[s, 0]) / c - 0.5
    gz = (z - origin[s, 1]) / c - 0.5
    i0 = int(math.floor(gx))
    j0 = int(math.floor(gz))
    fx, fz = gx - i0, gz - j0
    c00 = _cell_clearance(clear, s, j0, i0)
    c01 = _cell_clearance(clear, s, j0, i0 + 1)
    c10 = _cell_clearance(clear, s, j0 + 1, i0)
    c11 = _cell_clearance(clear, s, j0 + 1, i0 + 1)
    near = c00 + fx * (c01 - c00)
    far = c10 + fx * (c11 - c10)
    return near + fz * (far - near), ((1 - fz) * (c01 - c00) + fz * (c11 - c10)) / c, (far - near) / c


@numba.njit(cache=True, inline="always")
def _cell_clearance(clear, s, j, i):
    if j < 0 or j >= clear.shape[1] or i < 0 or i >= clear.shape[2]:
        return 0.0
    return clear[s, j, i]


@numba.njit(cache=True, inline="always")
def _forward_numba(clear, origin, cell, radius, s, px, pz, dx, dz, sub, substeps):
    """One forward move of ``substeps`` sub-steps (dx, dz) from (px, pz); a blocked target is projected onto the
    boundary (the twin's ``step`` says how). Returns the end point."""
    room = radius[s] - STAND_TOLERANCE  # the clearance an agent may stand at
    for _ in range(substeps):
        tx, tz = px + dx, pz + dz
        c, gx, gz = _clearance(clear, s, origin, cell, tx, tz)
        if c >= room:
            px, pz = tx, tz
            continue
        sx, sz = tx, tz
        for _ in range(SLIDE_ITERATIONS):
            g2 = gx * gx + gz * gz
            if g2 < MIN_GRADIENT2:
                break
            k = (radius[s] - c) / g2
            sx, sz = sx + k * gx, sz + k * gz
            c, gx, gz = _clearance(clear, s, origin, cell, sx, sz)
            if c >= room:
                break
        if c >= room and (sx - tx) ** 2 + (sz - tz) ** 2 <= (MAX_SLIDE_PUSH * sub) ** 2:
            px, pz = sx, sz
    return px, pz


@numba.njit(cache=True)
def _step_numba(clear, origin, cell, radius, scene_of, actions, x, z, theta, turn, forward_step, substeps, collided,
                moved):
    sub = forward_step / substeps
    for n in range(x.shape[0]):
        a = actions[n]
        if a == TURN_LEFT or a == TURN_RIGHT:
            th = theta[n] + (turn if a == TURN_LEFT else -turn)
            theta[n] = (th + math.pi) % (2 * math.pi) - math.pi
        if a != MOVE_FORWARD:
            continue
        th = np.float64(theta[n])  # math.sin of a float32 would run in float32; the twin computes in float64
        dx, dz = -math.sin(th) * sub, -math.cos(th) * sub
        x0, z0 = np.float64(x[n]), np.float64(z[n])
        x[n], z[n] = _forward_numba(clear, origin, cell, radius, scene_of[n], x0, z0, dx, dz, sub, substeps)
        moved2 = (np.float64(x[n]) - x0) ** 2 + (np.float64(z[n]) - z0) ** 2
        collided[n] = moved2 + COLLISION_EPS < forward_step * forward_step
        moved[n] = math.sqrt(moved2)


def step(atlas, scene_of, x, z, theta, actions, turn, forward_step, substeps):
    """Habitat's discrete actions, in place on CPU tensors x, z, theta; returns (collided, distance moved)."""
    collided = np.zeros(x.shape[0], np.bool_)
    moved = np.zeros(x.shape[0], np.float32)
    v = atlas.host.view
    _step_numba(v(atlas.clearance), v(atlas.origin), v(atlas.cell), v(atlas.radius), as_numpy(scene_of),
                as_numpy(actions), as_numpy(x), as_numpy(z), as_numpy(theta), turn, forward_step, substeps, collided,
                moved)
    return torch.from_numpy(collided), torch.from_numpy(moved)


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


def geodesic(fields, rows, atlas, scene_of, x, z, goal_x, goal_z):
    out = np.empty(x.shape[0], np.float32)
    v = atlas.host.view
    _geodesic_numba(as_numpy(fields), as_numpy(rows), v(atlas.origin), v(atlas.geo_cell), as_numpy(scene_of),
                    as_numpy(x), as_numpy(z), as_numpy(goal_x), as_numpy(goal_z), NEAR_GOAL, out)
    return torch.from_numpy(out)


_render_threads_set = False


@numba.njit(parallel=True, fastmath=False, cache=True)
def _render_numba(occ, cidx, palette, origin, cell, ceil, scene_of, px, pz, theta, res, max_depth, sensor_h,
                  depth_out, rgb_out, want_depth, want_rgb):
    f = res / 2.0  # focal length in pixels for a 90 degree field of view
    for k in numba.prange(px.shape[0] * res):
        n = k // res
        col = k % res
        sn, cs = math.sin(theta[n]), math.cos(theta[n])
        xc = (col + 0.5 - res / 2.0) / f
        dx = -sn + xc * cs  # forward (-sin, -cos) plus xc * right (cos, -sin)
        dz = -cs - xc * sn
        t, side, hit_color = _cast_ray(occ, cidx, origin, cell, scene_of[n], px[n], pz[n], dx, dz)
        _shade_column(occ, cidx, palette, origin, cell, ceil, scene_of[n], px[n], pz[n], dx, dz, t, side, hit_color,
                      n, col, res, max_depth, sensor_h, depth_out, rgb_out, want_depth, want_rgb)


@numba.njit(cache=True, inline="always")
def _cast_ray(occ, cidx, origin, cell, s, x, z, dx, dz):
    """Amanatides & Woo along the floor plan from (x, z) in direction (dx, dz), whose forward component is 1: the
    z-depth of the first occupied cell, the side it was entered by (0: across x, 1: across z) and its palette
    index (an object's colour, or the wall colour of the room it is seen from; -1 for none)."""
    hm, wm = occ.shape[1], occ.shape[2]
    c = cell[s]
    gx = (x - origin[s, 0]) / c
    gz = (z - origin[s, 1]) / c
    i = int(math.floor(gx))
    j = int(math.floor(gz))
    step_i = 1 if dx > 0 else -1
    step_j = 1 if dz > 0 else -1
    inf = 1e30
    t_delta_i = c / abs(dx) if dx != 0 else inf
    t_delta_j = c / abs(dz) if dz != 0 else inf
    t_max_i = ((i + (1 if dx > 0 else 0)) - gx) * c / dx if dx != 0 else inf
    t_max_j = ((j + (1 if dz > 0 else 0)) - gz) * c / dz if dz != 0 else inf
    t = 0.0
    side = 0
    pj, pi = j, i
    for _ in range(hm + wm + 4):
        if j < 0 or j >= hm or i < 0 or i >= wm or occ[s, j, i] != 0:
            break
        pj, pi = j, i
        if t_max_i < t_max_j:
            t = t_max_i
            t_max_i += t_delta_i
            i += step_i
            side = 0
        else:
            t = t_max_j
            t_max_j += t_delta_j
            j += step_j
            side = 1
    hit_color = -1
    if 0 <= j < hm and 0 <= i < wm and occ[s, j, i] == 2:
        hit_color = cidx[s, j, i]
    elif cidx[s, pj, pi] >= 0:
        hit_color = cidx[s, pj, pi] + 1  # the wall colour of the room it is seen from
    return t, side, hit_color


@numba.njit(cache=True, inline="always")
def _shade_column(occ, cidx, palette, origin, cell, ceil, s, x, z, dx, dz, t, side, hit_color, n, col, res, max_depth,
                  sensor_h, depth_out, rgb_out, want_depth, want_rgb):
    """Image column ``col`` of env ``n``: the wall where it is nearer than the floor (or ceiling) plane for a row,
    the plane elsewhere; depth normalised by ``max_depth``, colours shaded by distance, wall stripes, floor checks."""
    hm, wm = occ.shape[1], occ.shape[2]
    c = cell[s]
    f = res / 2.0
    wall_gain = 0.0
    if want_rgb:
        u = z + t * dz if side == 0 else x + t * dx
        stripe = 0.88 + 0.12 * (int(math.floor(u * STRIPE)) & 1)
        wall_gain = stripe * (SIDE_SHADE[0] if side == 0 else SIDE_SHADE[1]) / (1.0 + ATTENUATION * t)
    for row in range(res):
        yc = (res / 2.0 - (row + 0.5)) / f
        if yc < 0:
            plane = sensor_h / -yc
        elif yc > 0:
            plane = (ceil[s] - sensor_h) / yc
        else:
            plane = 1e30
        is_wall = t <= plane
        d = t if is_wall else plane
        if want_depth:
            depth_out[n, row, col] = min(d, max_depth) / max_depth
        if not want_rgb:
            continue
        if is_wall:
            for ch in range(3):
                base = palette[hit_color, ch] if hit_color >= 0 else UNDER_WALL_RGB
                rgb_out[n, row, col, ch] = min(255.0, base * wall_gain)
        elif yc > 0:
            g = 1.0 / (1.0 + ATTENUATION * d)
            for ch in range(3):
                rgb_out[n, row, col, ch] = CEILING_RGB[ch] * g
        else:
            wx = x + d * dx
            wz = z + d * dz
            fi = int(math.floor((wx - origin[s, 0]) / c))
            fj = int(math.floor((wz - origin[s, 1]) / c))
            ci = -1
            if 0 <= fj < hm and 0 <= fi < wm and occ[s, fj, fi] == 0:
                ci = cidx[s, fj, fi]
            checker = 0.85 + 0.15 * ((int(math.floor(wx * CHECKER)) + int(math.floor(wz * CHECKER))) & 1)
            g = checker / (1.0 + ATTENUATION * d)
            for ch in range(3):
                base = palette[ci, ch] if ci >= 0 else UNDER_WALL_RGB
                rgb_out[n, row, col, ch] = min(255.0, base * g)


def set_render_threads(n: int) -> None:
    """Render on ``n`` threads (at most numba's pool, ``NUMBA_NUM_THREADS``), leaving torch's thread count alone.

    numba's OpenMP layer and torch share one libgomp, and numba starting its pool sets OpenMP's thread count to the
    pool's size (every core): from then on each torch op ran on all cores whatever ``torch.set_num_threads`` said,
    so two one-thread trainings side by side on two cores each ran torch on two, several times slower (bench/LOG.md,
    "Each rank on its own thread budget"). The pool is started here, and torch's count put back."""
    global _render_threads_set
    torch_threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))  # starts the pool the first time
    torch.set_num_threads(torch_threads)
    _render_threads_set = True


def render(atlas, scene_of, px, pz, theta, res, depth, rgb, max_depth, sensor_h):
    """atlas: a SceneAtlas on the CPU; state as CPU tensors or their numpy views. Writes into ``depth`` [N,res,res] /
    ``rgb``. Renders on torch's thread budget unless ``set_render_threads`` said otherwise."""
    if not _render_threads_set:
        set_render_threads(torch.get_num_threads())
    d = depth if depth is not None else torch.empty((1, 1, 1))
    c = rgb if rgb is not None else torch.empty((1, 1, 1, 3), dtype=torch.uint8)
    v = atlas.host.view
    _render_numba(
        v(atlas.occ), v(atlas.cidx), v(atlas.palette), v(atlas.origin), v(atlas.cell), v(atlas.ceiling),
        as_numpy(scene_of), as_numpy(px), as_numpy(pz), as_numpy(theta), res, max_depth, sensor_h, d.numpy(), c.numpy(),
        depth is not None, rgb is not None,
    )


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


def pose_sensors(rows, x, z, theta, goal_x, goal_z, start_x, start_z, start_theta):
    """(pointgoal_with_gps_compass [n, 2], gps [n, 2], compass [n, 1]) of the envs ``rows`` (all when None)."""
    rows = np.arange(x.shape[0]) if rows is None else as_numpy(rows)
    n = rows.shape[0]
    pointgoal, gps, compass = np.empty((n, 2), np.float32), np.empty((n, 2), np.float32), np.empty((n, 1), np.float32)
    _pose_sensors_numba(rows, *map(as_numpy, (x, z, theta, goal_x, goal_z, start_x, start_z, start_theta)),
                        pointgoal, gps, compass)
    return torch.from_numpy(pointgoal), torch.from_numpy(gps), torch.from_numpy(compass)


@numba.njit(cache=True, error_model="numpy")
def _tally_numba(actions, was_active, collided, moved, steps, path_length, collisions, max_steps, stop, truncated):
    for n in range(actions.shape[0]):
        collided[n] &= was_active[n]
        steps[n] += was_active[n]
        path_length[n] += moved[n]
        collisions[n] += collided[n]
        stop[n] = actions[n] == STOP and was_active[n]
        truncated[n] = was_active[n] and not stop[n] and steps[n] >= max_steps


def tally(task, actions, was_active, collided, moved, steps, path_length, collisions):
    """Count the step taken into the episode's steps, path length and collisions (in place); returns (stop,
    terminated, truncated)."""
    stop, truncated = np.empty(actions.shape[0], np.bool_), np.empty(actions.shape[0], np.bool_)
    _tally_numba(*map(as_numpy, (actions, was_active, collided, moved, steps, path_length, collisions)),
                 task.max_episode_steps, stop, truncated)
    stop = torch.from_numpy(stop)
    return stop, stop.clone(), torch.from_numpy(truncated)


# error_model="numpy": a degenerate episode (its start on the goal) divides by zero into inf/NaN, as the torch one
# does, instead of raising ZeroDivisionError
@numba.njit(cache=True, error_model="numpy")
def _pointnav_step_numba(stop, was_active, prev_distance, distance, start_distance, path_length, success_distance,
                         slack, success_reward, reward, success, spl, softspl):
    for n in range(stop.shape[0]):
        won = stop[n] and distance[n] < success_distance
        progress = prev_distance[n] - distance[n]
        if not math.isfinite(progress):
            progress = 0.0
        reward[n] = (slack + progress + (success_reward if won else 0.0)) if was_active[n] else 0.0
        success[n] = 1.0 if won else 0.0
        longest = max(path_length[n], start_distance[n])
        spl[n] = (1.0 if won else 0.0) * start_distance[n] / longest
        made = 1.0 - distance[n] / start_distance[n]
        softspl[n] = (0.0 if made < 0.0 else made) * start_distance[n] / longest


def pointnav_step(task, stop, was_active, prev_distance, distance, start_distance, path_length):
    """PointNav's reward and metrics of one step (``ddppo.sim.task.pointnav_step``; ``distance`` a tensor)."""
    reward, success, spl_, softspl = (np.empty(stop.shape[0], np.float32) for _ in range(4))
    _pointnav_step_numba(*map(as_numpy, (stop, was_active, prev_distance, distance, start_distance, path_length)),
                         task.success_distance, task.slack_reward, task.success_reward, reward, success, spl_, softspl)
    t = torch.from_numpy
    return t(reward), {"success": t(success), "spl": t(spl_), "softspl": t(softspl),
                       "distance_to_goal": distance.clone()}
