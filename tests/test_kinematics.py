"""Habitat's discrete actions in the batched simulator (turns of 10°, forward moves of 0.25 m along -z at heading 0,
sliding collisions), for both movers, and the agent-frame goal / GPS conventions of ``ddppo.sim.geometry``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddppo.sim.batch_sim import BatchSimulator, SceneAtlas
from ddppo.sim.floorplan import generate_floor_plan, scene_seed
from ddppo.sim.geometry import (
    MOVE_FORWARD,
    STOP,
    TURN_LEFT,
    TURN_RIGHT,
    episodic_gps,
    heading_to_quaternion,
    pointgoal_polar,
    quaternion_to_heading,
)
from ddppo.sim.navmesh import NavGrid

KERNELS = ("numba", "torch")
NO_FIELD = np.zeros((1, 1), np.float32)
RADIUS = 0.1
SUBSTEP = 0.05  # the movers split a 0.25 m move into sub-steps of one 0.05 m cell


@pytest.fixture(scope="module")
def hall_nav(make_scene):
    """10 m (x) by 6 m (z) room; the walls' inner faces are at x = 0.1, 9.9 and z = 0.1, 5.9."""
    return NavGrid(make_scene(np.zeros((120, 200), np.uint8)))


def make_sim(navs, poses, kernels):
    navs = navs if isinstance(navs, list) else [navs]
    sim = BatchSimulator(SceneAtlas(navs), len(poses), 8, (), kernels=kernels)
    s, x, z, th = (list(v) for v in zip(*poses))
    sim.place(torch.arange(len(poses)), s, x, z, th, [NO_FIELD] * len(poses))
    return sim


def act(sim, action):
    return sim.step(torch.full((sim.num_envs,), action, dtype=torch.long))


def angle_diff(a, b):
    return (np.asarray(a, float) - np.asarray(b, float) + math.pi) % (2 * math.pi) - math.pi


# ---------------------------------------------------------------------------------------------------- turning
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("action, sign", [(TURN_LEFT, 1.0), (TURN_RIGHT, -1.0)])
def test_36_turns_return_the_heading(hall_nav, kernels, action, sign):
    starts = [0.0, 0.3, -2.0, math.pi - 0.01]
    sim = make_sim(hall_nav, [(0, 5.0, 3.0, t) for t in starts], kernels)
    for k in range(1, 37):
        collided, moved = act(sim, action)
        assert not collided.any() and moved.max().item() == 0.0
        expected = np.array(starts) + sign * k * math.radians(10)
        assert np.abs(angle_diff(sim.theta.numpy(), expected)).max() < 1e-4, k
        assert (sim.theta.abs() <= math.pi + 1e-6).all()
    assert np.abs(angle_diff(sim.theta.numpy(), starts)).max() < 1e-4
    np.testing.assert_array_equal(sim.x.numpy(), 5.0)
    np.testing.assert_array_equal(sim.z.numpy(), 3.0)


@pytest.mark.parametrize("kernels", KERNELS)
def test_stop_does_nothing(hall_nav, kernels):
    sim = make_sim(hall_nav, [(0, 5.0, 3.0, 0.7)], kernels)
    collided, moved = act(sim, STOP)
    assert not collided.any() and moved.item() == 0.0
    assert (sim.x.item(), sim.z.item()) == (5.0, 3.0) and sim.theta.item() == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize(
    "theta, dx, dz",
    [
        (0.0, 0.0, -0.25),  # heading 0 looks along -z
        (math.pi / 2, -0.25, 0.0),  # turned left by 90°: looks along -x
        (-math.pi / 2, 0.25, 0.0),
        (math.pi, 0.0, 0.25),
        (math.pi / 4, -0.25 * math.sqrt(0.5), -0.25 * math.sqrt(0.5)),
    ],
)
def test_forward_moves_a_quarter_metre_along_the_view(hall_nav, kernels, theta, dx, dz):
    sim = make_sim(hall_nav, [(0, 5.0, 3.0, theta)], kernels)
    for k in range(1, 5):
        collided, moved = act(sim, MOVE_FORWARD)
        assert not collided.item()
        assert moved.item() == pytest.approx(0.25, abs=1e-5)
        assert sim.x.item() == pytest.approx(5.0 + k * dx, abs=1e-5)
        assert sim.z.item() == pytest.approx(3.0 + k * dz, abs=1e-5)


@pytest.mark.parametrize("kernels", KERNELS)
def test_turn_left_then_forward_goes_to_the_left(hall_nav, kernels):
    """Facing -z, the agent's left is -x: nine left turns and a step forward move it to smaller x."""
    sim = make_sim(hall_nav, [(0, 5.0, 3.0, 0.0)], kernels)
    for _ in range(9):
        act(sim, TURN_LEFT)
    act(sim, MOVE_FORWARD)
    assert sim.x.item() == pytest.approx(4.75, abs=1e-4)
    assert sim.z.item() == pytest.approx(3.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------------- collisions
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize(
    "x, z, theta, axis, face, direction",
    [
        (5.0, 1.0, 0.0, "z", 0.1, -1),  # north wall (z = 0.1), walking along -z
        (5.0, 5.0, math.pi, "z", 5.9, 1),
        (1.0, 3.0, math.pi / 2, "x", 0.1, -1),
        (9.0, 3.0, -math.pi / 2, "x", 9.9, 1),
    ],
)
def test_walking_into_a_wall_stops_before_it(hall_nav, kernels, x, z, theta, axis, face, direction):
    sim = make_sim(hall_nav, [(0, x, z, theta)], kernels)
    collisions = 0
    for _ in range(50):
        collided, _ = act(sim, MOVE_FORWARD)
        collisions += int(collided.item())
        pos = (sim.z if axis == "z" else sim.x).item()
        gap = (face - pos) * direction  # distance from the agent's centre to the wall face
        assert gap >= RADIUS - SUBSTEP - 1e-5, gap
        assert gap > 0
    assert gap <= RADIUS + 0.25  # it did walk up to the wall
    assert collisions >= 40  # every step after reaching the wall is a collision
    other = (sim.x if axis == "z" else sim.z).item()
    assert other == pytest.approx(x if axis == "z" else z, abs=1e-4)  # head-on: no sideways drift


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize(
    "x, z, theta, slide_axis, slide_sign",
    [
        (5.0, 0.6, math.pi / 4, "x", -1),  # 45° into the north wall: slides towards -x
        (5.0, 0.6, -math.pi / 4, "x", 1),
        (0.6, 3.0, 3 * math.pi / 4, "z", 1),  # 45° into the west wall (facing -x, +z): slides towards +z
        (9.4, 3.0, -3 * math.pi / 4, "z", 1),
    ],
)
def test_walking_at_45_degrees_slides_along_the_wall(hall_nav, kernels, x, z, theta, slide_axis, slide_sign):
    sim = make_sim(hall_nav, [(0, x, z, theta)], kernels)
    for _ in range(4):  # reach the wall
        act(sim, MOVE_FORWARD)
    along = sim.x if slide_axis == "x" else sim.z
    across = sim.z if slide_axis == "x" else sim.x
    for _ in range(5):
        a0, c0 = along.item(), across.item()
        collided, moved = act(sim, MOVE_FORWARD)
        along = sim.x if slide_axis == "x" else sim.z
        across = sim.z if slide_axis == "x" else sim.x
        assert collided.item()
        assert (along.item() - a0) * slide_sign == pytest.approx(0.25 * math.sin(math.pi / 4), abs=0.01)
        assert across.item() == pytest.approx(c0, abs=1e-6)
        assert moved.item() == pytest.approx(0.25 * math.sin(math.pi / 4), abs=0.01)


@pytest.mark.parametrize("kernels", KERNELS)
def test_agent_cannot_pass_a_thin_wall(make_scene, kernels):
    """A one-cell (5 cm) wall across the room: 50 forward steps never cross it, at any angle of approach."""
    occ = np.zeros((120, 200), np.uint8)
    occ[60, :] = 1  # z in [3.0, 3.05)
    nav = NavGrid(make_scene(occ))
    thetas = np.linspace(-1.4, 1.4, 15)  # all headings with a -z component
    sim = make_sim(nav, [(0, 5.0, 4.5, t) for t in thetas], kernels)
    for _ in range(50):
        act(sim, MOVE_FORWARD)
        assert (sim.z >= 3.05 + RADIUS - SUBSTEP - 1e-5).all()


@pytest.mark.parametrize("x, z, distance, at_corner", [
    (3.05, 3.05, math.hypot(0.05, 0.05), True),  # diagonally off the box's corner
    (2.5, 3.1, 0.1, False),  # straight across from its face
    (3.0, 3.2, 0.2, False),  # across from the face's very end
    (1.9, 1.8, math.hypot(0.1, 0.2), True),
])
def test_nearest_geometry_by_hand(make_scene, x, z, distance, at_corner):
    occ = np.zeros((120, 120), np.uint8)
    occ[40:60, 40:60] = 1  # x and z in [2, 3)
    assert make_scene(occ).nearest_geometry(x, z) == (pytest.approx(distance), at_corner)


@pytest.mark.parametrize("kernels", KERNELS)
def test_walking_into_a_box_corner_slides_round_it(make_scene, kernels):
    """A 1 m box with its corner at (3, 3); agents walk at it from 9 headings (5°-85°) along 61 parallel lines 1 cm
    apart, from 0.3 m one side of the corner to 0.3 m the other. Each glides round the corner's curve (the free space
    is the box grown by the radius, a quarter circle round the corner): no step moves under 1 cm, except for the one
    agent aimed at the corner along its diagonal, where the curve's normal opposes the motion exactly (habitat's
    navmesh, which cuts the corner with a 45° edge, stops it there too)."""
    occ = np.zeros((120, 120), np.uint8)
    occ[40:60, 40:60] = 1  # x and z in [2, 3)
    poses, aimed = [], []
    for degrees in range(5, 86, 10):
        theta = math.radians(degrees)
        ux, uz = -math.sin(theta), -math.cos(theta)
        for offset in np.linspace(-0.3, 0.3, 61):
            poses.append((0, 3.0 - ux + offset * uz, 3.0 - uz - offset * ux, theta))
            aimed.append(degrees == 45 and abs(offset) < 1e-9)
    sim = make_sim(NavGrid(make_scene(occ)), poses, kernels)
    still = np.zeros(len(poses), bool)
    for _ in range(12):
        _, moved = act(sim, MOVE_FORWARD)
        still |= moved.numpy() < 0.01
    assert still[np.array(aimed)].all()
    assert not still[~np.array(aimed)].any(), [poses[k] for k in np.nonzero(still & ~np.array(aimed))[0]]


@pytest.fixture(scope="module")
def generated_navs():
    return [NavGrid(generate_floor_plan(scene_seed(0, "train", k), f"train_{k}")) for k in range(2)]


def test_movers_agree_on_random_walks(generated_navs):
    rng = np.random.default_rng(7)
    n = 24
    scenes = rng.integers(0, len(generated_navs), n)
    xz = np.stack([generated_navs[s].sample_navigable(rng, 1)[0] for s in scenes])
    theta = rng.uniform(-math.pi, math.pi, n)
    poses = list(zip(scenes, xz[:, 0], xz[:, 1], theta))
    a, b = make_sim(generated_navs, poses, "numba"), make_sim(generated_navs, poses, "torch")
    total_collisions = 0
    for _ in range(80):
        actions = torch.from_numpy(rng.choice(4, size=n, p=[0.05, 0.65, 0.15, 0.15]))
        ca, ma = a.step(actions)
        cb, mb = b.step(actions)
        assert torch.equal(ca, cb)
        total_collisions += int(ca.sum())
        for attr in ("x", "z", "theta"):  # bit for bit: both compute the move in float64 (docs/design.md)
            assert torch.equal(getattr(a, attr), getattr(b, attr)), attr
        assert torch.equal(ma, mb)
    assert total_collisions > 10  # the walks did run into walls
    # every agent still keeps its radius from geometry: within 3 mm (bilinear clearance rounds a box's corner
    # slightly outside the true circle)
    for k in range(n):
        gap = generated_navs[int(scenes[k])].scene.nearest_geometry(a.x[k].item(), a.z[k].item())[0]
        assert gap >= RADIUS - 0.003, (k, gap)



# --------------------------------------------------------------------------------------------- agent frame
def polar(pos, theta, goal):
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    return pointgoal_polar(t(pos[0]), t(pos[1]), t(theta), t(goal[0]), t(goal[1]))[0].numpy()


@pytest.mark.parametrize(
    "pos, theta, goal, rho, phi",
    [
        ((0.0, 0.0), 0.0, (0.0, -3.0), 3.0, 0.0),  # straight ahead (-z)
        ((0.0, 0.0), 0.0, (-2.0, 0.0), 2.0, math.pi / 2),  # exactly left (-x)
        ((0.0, 0.0), 0.0, (2.0, 0.0), 2.0, -math.pi / 2),  # exactly right
        ((0.0, 0.0), 0.0, (1.0, -1.0), math.sqrt(2), -math.pi / 4),  # ahead and to the right
        ((1.0, 2.0), 0.0, (0.0, 1.0), math.sqrt(2), math.pi / 4),  # ahead-left, agent off the origin
        ((0.0, 0.0), math.pi / 2, (-4.0, 0.0), 4.0, 0.0),  # facing -x, goal along -x: ahead
        ((0.0, 0.0), math.pi / 2, (0.0, 1.0), 1.0, math.pi / 2),  # facing -x, +z is on the left
        ((0.0, 0.0), -math.pi / 2, (0.0, -1.0), 1.0, math.pi / 2),  # facing +x, -z is on the left
        ((3.0, 3.0), math.pi, (3.0, 5.0), 2.0, 0.0),  # facing +z
    ],
)
def test_pointgoal_polar_hand_cases(pos, theta, goal, rho, phi):
    r, p = polar(pos, theta, goal)
    assert r == pytest.approx(rho, abs=1e-5)
    assert p == pytest.approx(phi, abs=1e-5)


@pytest.mark.parametrize("theta", [0.0, 0.5, math.pi / 2, -2.0])
def test_pointgoal_behind_is_pi(theta):
    fwd = np.array([-math.sin(theta), -math.cos(theta)])
    r, p = polar((1.0, 1.0), theta, (1.0 - 2.5 * fwd[0], 1.0 - 2.5 * fwd[1]))
    assert r == pytest.approx(2.5, abs=1e-5)
    assert abs(p) == pytest.approx(math.pi, abs=1e-5)


def test_pointgoal_matches_habitat_formula_on_random_cases():
    """[rho, -phi] with d = R(theta)^-1 (goal - pos), phi = atan2(d_x, -d_z), R a rotation about +y."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        pos, goal = rng.uniform(-5, 5, 2), rng.uniform(-5, 5, 2)
        theta = rng.uniform(-math.pi, math.pi)
        c, s = math.cos(theta), math.sin(theta)
        rot_y = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])  # right-handed rotation about +y by theta
        d = rot_y.T @ np.array([goal[0] - pos[0], 0.0, goal[1] - pos[1]])
        r, p = polar(pos, theta, goal)
        assert r == pytest.approx(np.hypot(d[0], d[2]), abs=1e-4)
        assert p == pytest.approx(-math.atan2(d[0], -d[2]), abs=1e-4)
        # and the rotation really turns the agent's view: R @ (0, 0, -1) is the forward direction
        np.testing.assert_allclose(rot_y @ [0, 0, -1], [-s, 0, -c], atol=1e-12)


@pytest.mark.parametrize(
    "start, start_theta, pos, gps",
    [
        ((0.0, 0.0), 0.0, (0.0, -1.5), (1.5, 0.0)),  # moved 1.5 m forward
        ((0.0, 0.0), 0.0, (-1.0, 0.0), (0.0, -1.0)),  # moved 1 m to the left: [-z, x] = [0, -1]
        ((2.0, 1.0), math.pi / 2, (1.0, 1.0), (1.0, 0.0)),  # facing -x at the start, moved along -x: forward
        ((2.0, 1.0), math.pi / 2, (2.0, 3.0), (0.0, -2.0)),  # +z is the start frame's left
        ((0.0, 0.0), math.pi, (1.0, 2.0), (2.0, -1.0)),
    ],
)
def test_episodic_gps_hand_cases(start, start_theta, pos, gps):
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    out = episodic_gps(t(pos[0]), t(pos[1]), t(start[0]), t(start[1]), t(start_theta))[0].numpy()
    np.testing.assert_allclose(out, gps, atol=1e-5)


@pytest.mark.parametrize("theta", [0.0, 0.3, math.pi / 2, -math.pi / 2, 3.0, -3.0])
def test_heading_quaternion_round_trip(theta):
    q = heading_to_quaternion(theta)
    assert q[0] == 0.0 and q[2] == 0.0
    assert sum(v * v for v in q) == pytest.approx(1.0)
    assert quaternion_to_heading(q) == pytest.approx(theta, abs=1e-9)
    # habitat's convention: the quaternion of heading theta rotates (0, 0, -1) to (-sin theta, 0, -cos theta)
    x, y, z, w = q
    v = np.array([0.0, 0.0, -1.0])
    u = np.array([x, y, z])
    rotated = v + 2 * w * np.cross(u, v) + 2 * np.cross(u, np.cross(u, v))
    np.testing.assert_allclose(rotated, [-math.sin(theta), 0, -math.cos(theta)], atol=1e-12)


@pytest.mark.parametrize("q", [[0.3, 0.0, 0.0, 0.95], [0.0, 0.0, 0.0, 0.0], [0.0, float("nan"), 0.0, 1.0]])
def test_quaternion_not_about_y_is_rejected(q):
    with pytest.raises(ValueError):
        quaternion_to_heading(q)
