"""Depth and RGB of the embedded simulator against hand-computed pinhole geometry (habitat's z-depth, 90° HFOV,
sensor 1.25 m above the floor, depth clipped at 10 m and normalised), and the numba / torch renderers against
each other."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddppo.sim.batch_sim import BatchSimulator, SceneAtlas
from ddppo.sim.floorplan import generate_floor_plan, scene_seed
from ddppo.sim.navmesh import NavGrid
from ddppo.sim.scene import OBJECT, WALL

RENDERERS = ("numba", "torch")
SENSOR_H = 1.25
CEILING = 2.6
NO_FIELD = np.zeros((1, 1), np.float32)


def render(scene_or_navs, poses, res=32, renderer="numba", sensors=("depth", "rgb")):
    """Render agents at poses [(scene_idx, x, z, theta)]; returns depth in metres [N,R,R] and rgb [N,R,R,3]."""
    navs = scene_or_navs if isinstance(scene_or_navs, list) else [NavGrid(scene_or_navs)]
    sim = BatchSimulator(SceneAtlas(navs), len(poses), res, sensors, kernels=renderer)
    s, x, z, th = (list(v) for v in zip(*poses))
    sim.place(torch.arange(len(poses)), s, x, z, th, [NO_FIELD] * len(poses))
    out = sim.render()
    depth = out["depth"][..., 0].numpy() * 10.0 if "depth" in out else None
    rgb = out["rgb"].numpy() if "rgb" in out else None
    return depth, rgb, out


def pixel_y(res):
    """Normalised image-plane height of each row's centre (focal length res/2 for a 90° HFOV)."""
    r = np.arange(res)
    return (res / 2 - (r + 0.5)) / (res / 2)


def pixel_x(res):
    c = np.arange(res)
    return (c + 0.5 - res / 2) / (res / 2)


def plane_depth(res, ceiling=CEILING):
    """z-depth of the floor (y < 0) or ceiling (y > 0) seen by each row."""
    y = pixel_y(res)
    with np.errstate(divide="ignore"):  # the horizon row of an odd resolution sees neither plane
        return np.where(y < 0, SENSOR_H / np.abs(y), (ceiling - SENSOR_H) / np.abs(y))


def expected_with_wall(wall_depth, res, ceiling=CEILING):
    """Image of a flat wall at per-column z-depth ``wall_depth`` (scalar or [res]) with floor and ceiling."""
    wall = np.broadcast_to(np.asarray(wall_depth, float), (res,))[None, :]
    return np.minimum(np.minimum(wall, plane_depth(res, ceiling)[:, None]), 10.0)


@pytest.fixture(scope="module")
def hall(make_scene):
    """10 m (x) by 6 m (z) room; the walls' inner faces are at x = 0.1, 9.9 and z = 0.1, 5.9."""
    return make_scene(np.zeros((120, 200), np.uint8))


def assert_shade_of(pixel, base, lo=0.3):
    """``pixel`` is the colour ``base`` darkened by one common factor (shading and distance attenuation)."""
    pixel, base = np.asarray(pixel, float), np.asarray(base, float)
    g = pixel.sum() / base.sum()
    assert lo < g <= 1.0, (pixel, base, g)
    np.testing.assert_allclose(pixel, g * base, atol=3.0, err_msg=f"{pixel} is not a shade of {base}")


# ------------------------------------------------------------------------------------------------------ depth


WALL_POSES = [
    (5.0, 2.0, 0.0),  # facing -z: wall face z = 0.1, 1.9 m ahead
    (8.0, 3.0, -math.pi / 2),  # facing +x: wall face x = 9.9, 1.9 m ahead
    (2.0, 3.0, math.pi / 2),  # facing -x: wall face x = 0.1, 1.9 m ahead
    (5.0, 4.0, math.pi),  # facing +z: wall face z = 5.9, 1.9 m ahead
]


@pytest.mark.parametrize(
    "renderer, res, x, z, theta",
    [
        pytest.param(r, res, *pose, marks=[])
        for r in RENDERERS
        for res in (17, 32, 64)
        for pose in WALL_POSES
    ],
)
def test_flat_wall_has_the_same_z_depth_in_every_column(hall, renderer, res, x, z, theta):
    depth, _, out = render(hall, [(0, x, z, theta)], res=res, renderer=renderer)
    assert out["depth"].shape == (1, res, res, 1) and out["depth"].dtype == torch.float32
    assert out["rgb"].shape == (1, res, res, 3) and out["rgb"].dtype == torch.uint8
    expected = expected_with_wall(1.9, res)
    # every column of a row through the horizon sees the wall at the same perpendicular distance
    mid = res // 2
    np.testing.assert_allclose(depth[0, mid], np.full(res, 1.9), atol=1e-4)
    np.testing.assert_allclose(depth[0], expected, atol=1e-4)


def test_torch_renderer_ray_parallel_to_grid_axis(hall):
    """Odd resolution, heading exactly 0: the centre column's ray runs exactly along -z. Its depth is the wall's
    1.9 m (the numba renderer gets it right); the torch renderer returns 0 for the whole column."""
    res = 17
    d_numba, rgb_numba, _ = render(hall, [(0, 5.0, 2.0, 0.0)], res=res, renderer="numba")
    d_torch, rgb_torch, _ = render(hall, [(0, 5.0, 2.0, 0.0)], res=res, renderer="torch")
    assert d_numba[0, res // 2, res // 2] == pytest.approx(1.9, abs=1e-4)
    np.testing.assert_allclose(d_torch[0, :, res // 2], d_numba[0, :, res // 2], atol=1e-4)
    assert np.abs(rgb_torch.astype(int) - rgb_numba.astype(int)).max() <= 1


@pytest.mark.parametrize("renderer", RENDERERS)
def test_depth_does_not_depend_on_origin_or_cell_size(hall, renderer):
    """The same room as ``hall`` with 0.1 m cells and origin (-3, 7), next to it in one atlas: identical depth
    from the same pose relative to the room."""
    occ = np.zeros((60, 100), np.uint8)
    occ[:1] = occ[-1:] = occ[:, :1] = occ[:, -1:] = WALL
    coarse = dataclasses.replace(hall, name="coarse", cell_size=0.1, origin=(-3.0, 7.0), occupancy=occ,
                                 material=np.zeros(occ.shape, np.int32))
    coarse.validate("coarse")
    navs = [NavGrid(hall), NavGrid(coarse)]
    poses = [(0, 3.3, 2.2, 0.7), (1, 0.3, 9.2, 0.7), (0, 8.0, 4.0, -2.5), (1, 5.0, 11.0, -2.5)]
    depth, _, _ = render(navs, poses, res=32, renderer=renderer)
    np.testing.assert_allclose(depth[1], depth[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(depth[3], depth[2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(depth[0], depth[2])


@pytest.mark.parametrize("renderer", RENDERERS)
def test_oblique_wall_depth_is_perpendicular_distance(hall, renderer):
    """Agent turned 20° left of the wall normal: z-depth of column c is 1.9 / (cos θ + x_c sin θ)."""
    res, theta = 32, math.radians(20)
    depth, _, _ = render(hall, [(0, 5.0, 2.0, theta)], res=res, renderer=renderer)
    xc = pixel_x(res)
    wall = 1.9 / (math.cos(theta) + xc * math.sin(theta))
    np.testing.assert_allclose(depth[0], expected_with_wall(wall, res), rtol=1e-5, atol=1e-4)
    assert depth[0, res // 2, 0] > depth[0, res // 2, -1]  # the left edge looks further along the wall


@pytest.mark.parametrize(
    "renderer, res",
    [
        pytest.param(r, res, marks=[])
        for r in RENDERERS
        for res in (17, 32, 64)
    ],
)
def test_floor_and_ceiling_rows(make_scene, renderer, res):
    """Floor row r sits at y = (R/2 - (r + 0.5)) / (R/2) below the horizon: depth 1.25 / -y; ceiling (2.6 m):
    depth 1.35 / y. Looking down a 19 m corridor the far wall hides nothing near the image edge."""
    corridor = make_scene(np.zeros((400, 80), np.uint8))  # 4 m (x) by 20 m (z)
    depth, rgb, _ = render(corridor, [(0, 2.0, 19.0, 0.0)], res=res, renderer=renderer)
    y = pixel_y(res)
    bottom, top = res - 1, 0
    assert depth[0, bottom, res // 2] == pytest.approx(1.25 / -y[bottom], rel=1e-5)
    assert depth[0, top, res // 2] == pytest.approx(1.35 / y[top], rel=1e-5)
    floor_rows = np.nonzero((y < 0) & (plane_depth(res) < 1.5))[0]
    assert len(floor_rows) >= 1
    for r in floor_rows:  # a horizontal plane: same z-depth across the row
        np.testing.assert_allclose(depth[0, r], np.full(res, 1.25 / -y[r]), rtol=1e-5)
    # the ceiling is grey (CEILING_RGB-like: equal channels), the floor has the room's floor colour
    assert_shade_of(rgb[0, top, res // 2], (205, 205, 210))
    assert_shade_of(rgb[0, bottom, res // 2], (120, 120, 120))


@pytest.mark.parametrize("renderer", RENDERERS)
def test_ceiling_height_moves_the_ceiling_not_the_floor(make_scene, renderer):
    res = 32
    low = make_scene(np.zeros((400, 80), np.uint8), ceiling_height=2.4)
    high = make_scene(np.zeros((400, 80), np.uint8), ceiling_height=3.2)
    d_low, _, _ = render(low, [(0, 2.0, 19.0, 0.0)], res=res, renderer=renderer)
    d_high, _, _ = render(high, [(0, 2.0, 19.0, 0.0)], res=res, renderer=renderer)
    y = pixel_y(res)
    assert d_low[0, 0, 5] == pytest.approx((2.4 - 1.25) / y[0], rel=1e-5)
    assert d_high[0, 0, 5] == pytest.approx((3.2 - 1.25) / y[0], rel=1e-5)
    np.testing.assert_array_equal(d_low[0, -1], d_high[0, -1])


@pytest.mark.parametrize("renderer", RENDERERS)
def test_depth_clipped_at_10m_and_normalised(make_scene, renderer):
    """Down a 4 m wide, 20 m long corridor: the far wall (18.9 m) reads exactly 1.0 (clipped at 10 m); the side
    walls, parallel to the view, sit at z-depth 1.9 / |x_c|; everything lies in [0, 1]."""
    corridor = make_scene(np.zeros((400, 80), np.uint8))
    res = 32
    _, _, out = render(corridor, [(0, 2.0, 19.0, 0.0)], res=res, renderer=renderer, sensors=("depth",))
    d = out["depth"][0, ..., 0].numpy()
    assert "rgb" not in out
    assert d.min() >= 0.0 and d.max() <= 1.0
    walls = np.minimum(1.9 / np.abs(pixel_x(res)), 18.9)
    expected = expected_with_wall(walls, res) / 10.0
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-6)
    clipped = expected == 1.0
    assert clipped[res // 2].sum() >= 4  # some horizon pixels look past 10 m
    np.testing.assert_array_equal(d[clipped], 1.0)


@pytest.mark.parametrize("renderer", RENDERERS)
def test_object_in_front_of_wall(make_scene, renderer):
    """A 0.4 m box whose near face is 1.2 m ahead hides the wall (3.9 m) in the central columns only."""
    occ = np.zeros((120, 200), np.uint8)
    occ[50:56, 96:104] = OBJECT  # x in [4.8, 5.2), z in [2.5, 2.8)
    material = np.zeros(occ.shape, np.int32)
    green = (40, 210, 60)
    scene = make_scene(occ, material=material, room_colors=[[[120, 120, 120], [220, 60, 60]]],
                       object_colors=[green])
    res = 32
    depth, rgb, _ = render(scene, [(0, 5.0, 4.0, 0.0)], res=res, renderer=renderer)
    xc = pixel_x(res)
    hits_box = np.abs(1.2 * xc) < 0.2 - 1e-6
    misses_box = np.abs(3.9 * xc) > 0.2 + 1e-6  # their ray passes beside the box all the way to the wall
    wall = np.where(hits_box, 1.2, 3.9)
    cols = hits_box | misses_box
    exp = expected_with_wall(wall, res)
    np.testing.assert_allclose(depth[0][:, cols], exp[:, cols], rtol=1e-5, atol=1e-4)
    mid = res // 2
    assert_shade_of(rgb[0, mid, mid], green)
    assert_shade_of(rgb[0, mid, 0], (220, 60, 60))


@pytest.fixture(scope="module")
def two_rooms(make_scene):
    """Rooms left (x < 5) and right (x > 5.15) of a full wall; distinct floor and wall colours."""
    occ = np.zeros((120, 200), np.uint8)
    occ[:, 100:103] = WALL
    material = np.zeros(occ.shape, np.int32)
    material[:, 103:] = 1
    colours = [[[200, 200, 60], [220, 60, 60]], [[60, 200, 200], [60, 60, 220]]]  # [floor, wall] per room
    return make_scene(occ, material=material, room_colors=colours), colours


@pytest.mark.parametrize("renderer", RENDERERS)
def test_wall_and_floor_colours_come_from_the_room_seen_from(two_rooms, renderer):
    scene, colours = two_rooms
    res = 32
    poses = [(0, 3.0, 3.0, -math.pi / 2), (0, 7.15, 3.0, math.pi / 2)]  # both face the dividing wall, 2 m away
    depth, rgb, _ = render(scene, poses, res=res, renderer=renderer)
    mid = res // 2
    np.testing.assert_allclose(depth[:, mid, mid], [2.0, 2.0], atol=1e-4)
    for k in range(2):
        floor, wall = colours[k]
        assert_shade_of(rgb[k, mid, mid], wall)
        assert_shade_of(rgb[k, res - 1, mid], floor)
        other_wall = colours[1 - k][1]
        assert np.abs(rgb[k, mid, mid].astype(float) - other_wall).max() > 60
    assert np.abs(rgb[0].astype(int) - rgb[1].astype(int)).mean() > 30


@pytest.mark.parametrize("renderer", RENDERERS)
def test_same_pose_same_image(two_rooms, renderer):
    scene, _ = two_rooms
    poses = [(0, 2.3, 1.7, 0.4), (0, 8.1, 4.2, -2.0)]
    _, _, a = render(scene, poses, renderer=renderer)
    _, _, b = render(scene, poses, renderer=renderer)
    for k in a:
        assert torch.equal(a[k], b[k])
    # and different poses give different images
    _, _, c = render(scene, [(0, 2.3, 1.7, 0.5), (0, 8.1, 4.2, -2.0)], renderer=renderer)
    assert not torch.equal(a["depth"][0], c["depth"][0])
    assert torch.equal(a["depth"][1], c["depth"][1])


@pytest.fixture(scope="module")
def generated_navs():
    return [NavGrid(generate_floor_plan(scene_seed(0, "train", k), f"train_{k}")) for k in range(3)]


@pytest.mark.parametrize("res", [17, 32, 64])
def test_numba_and_torch_renderers_agree_on_generated_plans(generated_navs, res):
    rng = np.random.default_rng(res)
    n = 24
    scenes = rng.integers(0, len(generated_navs), n)
    xz = np.stack([generated_navs[s].sample_navigable(rng, 1)[0] for s in scenes])
    theta = rng.uniform(-math.pi, math.pi, n)
    poses = list(zip(scenes, xz[:, 0], xz[:, 1], theta))
    _, _, a = render(generated_navs, poses, res=res, renderer="numba")
    _, _, b = render(generated_navs, poses, res=res, renderer="torch")
    assert (a["depth"] - b["depth"]).abs().max().item() <= 1e-5
    assert (a["rgb"].int() - b["rgb"].int()).abs().max().item() <= 1
    # the poses really see walls, floor and ceiling (not one flat colour)
    assert a["depth"].std() > 0.05 and a["rgb"].float().std() > 10


def test_renderers_agree_on_pixels_along_cell_boundaries(make_scene):
    """Rays grazing cell edges and corners (positions on cell boundaries, 45° headings)."""
    occ = np.zeros((120, 200), np.uint8)
    occ[40:44, 60:64] = OBJECT
    occ[70:72, 120:160] = WALL
    scene = make_scene(occ, object_colors=[(30, 90, 200)])
    poses = [(0, 2.5, 3.0, math.pi / 4), (0, 5.0, 5.0, 0.0), (0, 3.0, 3.5, 3 * math.pi / 4),
             (0, 6.0, 2.0, -math.pi / 4), (0, 4.0, 4.0, math.pi / 2)]
    _, _, a = render(scene, poses, res=32, renderer="numba")
    _, _, b = render(scene, poses, res=32, renderer="torch")
    assert (a["depth"] - b["depth"]).abs().max().item() <= 1e-5
    assert (a["rgb"].int() - b["rgb"].int()).abs().max().item() <= 1


@pytest.mark.parametrize("budget", [1, 2])
def test_rendering_leaves_torchs_thread_budget_alone(budget):
    """numba's OpenMP pool and torch share one OpenMP runtime, and starting the pool set the runtime's thread count
    to the pool's size: a worker that gave torch one thread ran torch on every core after its first frame. The
    first render now starts the pool on torch's budget and puts torch's back. In a fresh process (numba starts its
    pool once per process) with a pool of 4, whatever the machine's cores."""
    code = f"""
import numpy as np, numba, torch
torch.set_num_threads({budget})
from ddppo.sim.batch_sim import BatchSimulator, SceneAtlas
from ddppo.sim.floorplan import generate_floor_plan, scene_seed
from ddppo.sim.navmesh import NavGrid
nav = NavGrid(generate_floor_plan(scene_seed(0, "train", 0), "train_0"))
sim = BatchSimulator(SceneAtlas([nav]), 1, 16, ("depth",), kernels="numba")
x, z = nav.sample_navigable(np.random.default_rng(0), 1)[0]
sim.place(torch.arange(1), [0], [x], [z], [0.0], [np.zeros((1, 1), np.float32)])
assert sim.render()["depth"].std() > 0
print(torch.get_num_threads(), numba.get_num_threads())
"""
    env = {**os.environ, "NUMBA_NUM_THREADS": "4"}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(budget), str(budget)]
