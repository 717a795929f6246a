"""Depth and RGB from a pinhole camera in a 2.5-D grid world.

Each image column is one ray cast along the floor plan with an exact grid traversal (Amanatides & Woo). The ray is
parameterised so that its parameter *is* the z-depth (the forward component of its direction is 1), which is what
habitat's depth sensor reports. A column then shows the wall where the wall is nearer than the floor (or ceiling)
plane for that row, the plane elsewhere. Depth is exact for the grid geometry up to float32 rounding.

Two implementations of the same picture (a plain dict picks one, see ``RENDERERS``):
- ``numba``: a compiled CPU kernel, parallel over columns: the fast path on CPU;
- ``torch``: vectorised over rays with empty-space skipping (a chessboard distance field lets a ray jump whole
  free squares), for CUDA devices. tests/test_render.py checks the two agree.
"""

from __future__ import annotations

import math

import numba
import torch

from ddppo.rows import as_numpy

# shading constants shared by both renderers
SIDE_SHADE = (1.0, 0.78)  # faces whose normal runs along x, along z
ATTENUATION = 0.04  # brightness 1 / (1 + ATTENUATION * depth)
STRIPE = 2.5  # wall stripes per metre
CHECKER = 2.0  # floor checks per metre
CEILING_RGB = (205.0, 205.0, 210.0)
UNDER_WALL_RGB = 110.0


@numba.njit(parallel=True, fastmath=False, cache=True)
def _render_numba(occ, cidx, palette, origin, cell, ceil, scene_of, px, pz, theta, res, max_depth, sensor_h,
                  depth_out, rgb_out, want_depth, want_rgb):
    n_env = px.shape[0]
    hm, wm = occ.shape[1], occ.shape[2]
    f = res / 2.0  # focal length in pixels for a 90 degree field of view
    for k in numba.prange(n_env * res):
        n = k // res
        col = k % res
        s = scene_of[n]
        c = cell[s]
        sn, cs = math.sin(theta[n]), math.cos(theta[n])
        xc = (col + 0.5 - res / 2.0) / f
        dx = -sn + xc * cs  # forward (-sin, -cos) plus xc * right (cos, -sin)
        dz = -cs - xc * sn
        gx = (px[n] - origin[s, 0]) / c
        gz = (pz[n] - origin[s, 1]) / c
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
        hit_color = -1
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
        inside = 0 <= j < hm and 0 <= i < wm
        if inside and occ[s, j, i] == 2:
            hit_color = cidx[s, j, i]
        elif cidx[s, pj, pi] >= 0:
            hit_color = cidx[s, pj, pi] + 1  # the wall colour of the room it is seen from
        if want_rgb:
            u = pz[n] + t * dz if side == 0 else px[n] + t * dx
            stripe = 0.88 + 0.12 * (int(math.floor(u * STRIPE)) & 1)
            wall_gain = stripe * (SIDE_SHADE[0] if side == 0 else SIDE_SHADE[1]) / (1.0 + ATTENUATION * t)
        for row in range(res):
            yc = (res / 2.0 - (row + 0.5)) / f
            if yc < 0:
                plane = sensor_h / -yc
            elif yc > 0:
                plane = (ceil[s] - sensor_h) / yc
            else:
                plane = inf
            is_wall = t <= plane
            d = t if is_wall else plane
            if want_depth:
                depth_out[n, row, col] = min(d, max_depth) / max_depth
            if want_rgb:
                if is_wall:
                    for ch in range(3):
                        base = palette[hit_color, ch] if hit_color >= 0 else UNDER_WALL_RGB
                        rgb_out[n, row, col, ch] = min(255.0, base * wall_gain)
                elif yc > 0:
                    g = 1.0 / (1.0 + ATTENUATION * d)
                    for ch in range(3):
                        rgb_out[n, row, col, ch] = CEILING_RGB[ch] * g
                else:
                    wx = px[n] + d * dx
                    wz = pz[n] + d * dz
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


_render_threads_set = False


def set_render_threads(n: int) -> None:
    """Render on ``n`` threads (at most numba's pool, ``NUMBA_NUM_THREADS``), leaving torch's thread count alone.

    numba's OpenMP layer and torch share one libgomp, and numba starting its pool sets OpenMP's thread count to the
    pool's size (every core): from then on each torch op ran on all cores whatever ``torch.set_num_threads`` said,
    so two one-thread trainings side by side on two cores each ran torch on two, 3.7x slower (bench/RESULTS.md,
    "Each rank on its own thread budget"). The pool is started here, and torch's count put back."""
    global _render_threads_set
    torch_threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))  # starts the pool the first time
    torch.set_num_threads(torch_threads)
    _render_threads_set = True


def render_numba(atlas, scene_of, px, pz, theta, res, depth, rgb, max_depth, sensor_h):
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


def cast_rays_torch(atlas, scene_of, px, pz, dx, dz):
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


def render_torch(atlas, scene_of, px, pz, theta, res, depth, rgb, max_depth, sensor_h):
    n = px.shape[0]
    dev = px.device
    f = res / 2.0
    xc = (torch.arange(res, device=dev, dtype=px.dtype) + 0.5 - res / 2.0) / f
    sn, cs = torch.sin(theta)[:, None], torch.cos(theta)[:, None]
    dx = (-sn + xc[None] * cs).reshape(-1)
    dz = (-cs - xc[None] * sn).reshape(-1)
    rep = lambda v: v[:, None].expand(n, res).reshape(-1)  # noqa: E731
    s = rep(scene_of)
    t, side, prev, hit = cast_rays_torch(atlas, s, rep(px), rep(pz), dx, dz)
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


RENDERERS = {"numba": render_numba, "torch": render_torch}
