"""``PointNavVectorEnv``: observations, habitat's reward / success / episode-end rules, automatic reset, episode
order, the shortest-path oracle, determinism, resume, CPU vs CUDA; and the metrics of ``ddppo.sim.task``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddppo.config import SimConfig, TaskConfig
from ddppo.numpy_views import HostViews, put_rows
from ddppo.sim.dataset import Episode, check_episodes_in_scenes
from ddppo.sim.dataset_dir import load_split
from ddppo.sim.geometry import MOVE_FORWARD, STOP, TURN_LEFT, TURN_RIGHT, heading_to_quaternion
from ddppo.sim.kernels import IMPLEMENTATIONS, select_kernels
from ddppo.sim.navmesh import NavGrid
from ddppo.sim.oracle import ShortestPathFollower
from ddppo.sim.task import pointnav_reward, soft_spl, spl
from ddppo.sim.vector_env import PointNavVectorEnv

TEN_DEG = math.radians(10)


def make_env(episodes, navs, num_envs=1, res=16, sensors=("rgb", "depth"), order="partition", seed=0,
             device="cpu", kernels="auto", **task):
    return PointNavVectorEnv(episodes, navs, num_envs, SimConfig(resolution=res, sensors=list(sensors),
                                                                 kernels=kernels),
                             TaskConfig(**task), seed=seed, device=device, order=order)


def ep(k, start, goal, heading=0.0, scene="room"):
    return Episode(str(k), scene, (start[0], 0.0, start[1]), tuple(heading_to_quaternion(heading)),
                   (goal[0], 0.0, goal[1]), math.dist(start, goal))


@pytest.fixture(scope="module")
def room(make_scene):
    """4.2 m square empty room (walls' inner faces at 0.1 and 4.1): geodesic = Euclidean distance."""
    return {"room": NavGrid(make_scene(np.zeros((84, 84), np.uint8), name="room"))}


def steps(env, actions):
    return env.step(torch.as_tensor(actions, dtype=torch.long).reshape(-1))


# ------------------------------------------------------------------------------------------- observations
def test_observation_keys_shapes_dtypes_ranges(small_dataset):
    episodes, navs = load_split(small_dataset, "val")
    env = make_env(episodes, navs, num_envs=3, res=24, order="shuffle")
    obs = env.reset()
    expected = {"rgb": ((3, 24, 24, 3), torch.uint8), "depth": ((3, 24, 24, 1), torch.float32),
                "pointgoal_with_gps_compass": ((3, 2), torch.float32), "gps": ((3, 2), torch.float32),
                "compass": ((3, 1), torch.float32)}
    assert set(obs) == set(expected) == set(env.obs_spaces)
    for k, (shape, dtype) in expected.items():
        assert tuple(obs[k].shape) == shape and obs[k].dtype == dtype, k
        assert env.obs_spaces[k] == (shape[1:], dtype)
    rng = np.random.default_rng(0)
    for _ in range(20):
        r = env.step(torch.from_numpy(rng.choice([1, 2, 3], size=3, p=[0.6, 0.2, 0.2])))
        for o in (r.obs, r.final_obs):
            assert 0.0 <= o["depth"].min() and o["depth"].max() <= 1.0
            assert (o["compass"].abs() <= math.pi + 1e-6).all()
            assert (o["pointgoal_with_gps_compass"][:, 0] >= 0).all()
            assert (o["pointgoal_with_gps_compass"][:, 1].abs() <= math.pi + 1e-6).all()
        assert r.reward.dtype == torch.float32 and r.reward.shape == (3,)
        assert r.terminated.dtype == torch.bool and r.truncated.dtype == torch.bool
    # the goal sensor agrees with the episode: rho = distance from the agent to the goal
    for e, episode in enumerate(env.current_episodes()):
        gx, _, gz = episode.goal_position
        rho = math.hypot(gx - env.sim.x[e].item(), gz - env.sim.z[e].item())
        assert r.obs["pointgoal_with_gps_compass"][e, 0].item() == pytest.approx(rho, abs=1e-4)


def test_blind_agent_gets_only_the_goal_sensors(room):
    env = make_env([ep(0, (1.0, 3.0), (1.0, 1.5))], room, sensors=())
    obs = env.reset()
    assert set(obs) == set(env.obs_spaces) == {"pointgoal_with_gps_compass", "gps", "compass"}
    np.testing.assert_allclose(obs["pointgoal_with_gps_compass"][0], [1.5, 0.0], atol=1e-5)


def test_initial_observation_hand_case(room):
    """Start (1, 3) facing +z (heading pi), goal (3, 3): the goal is 2 m away, exactly to the agent's left."""
    env = make_env([ep(0, (1.0, 3.0), (3.0, 3.0), heading=math.pi)], room)
    obs = env.reset()
    np.testing.assert_allclose(obs["pointgoal_with_gps_compass"][0], [2.0, math.pi / 2], atol=1e-5)
    np.testing.assert_allclose(obs["gps"][0], [0.0, 0.0], atol=1e-6)
    assert obs["compass"][0, 0].item() == pytest.approx(0.0, abs=1e-6)
    r = steps(env, [TURN_LEFT])
    assert r.obs["compass"][0, 0].item() == pytest.approx(TEN_DEG, abs=1e-5)
    np.testing.assert_allclose(r.obs["pointgoal_with_gps_compass"][0], [2.0, math.pi / 2 - TEN_DEG], atol=1e-5)
    for _ in range(8):
        r = steps(env, [TURN_LEFT])
    assert r.obs["compass"][0, 0].item() == pytest.approx(math.pi / 2, abs=1e-4)
    np.testing.assert_allclose(r.obs["pointgoal_with_gps_compass"][0], [2.0, 0.0], atol=1e-4)  # now ahead
    r = steps(env, [MOVE_FORWARD])  # facing +x: forward in the start frame is +z, so this is a move to the left
    np.testing.assert_allclose(r.obs["gps"][0], [0.0, -0.25], atol=1e-5)
    np.testing.assert_allclose(r.obs["pointgoal_with_gps_compass"][0], [1.75, 0.0], atol=1e-4)
    r = steps(env, [TURN_RIGHT])
    assert r.obs["compass"][0, 0].item() == pytest.approx(math.pi / 2 - TEN_DEG, abs=1e-4)


# ----------------------------------------------------------------------------------------- reward & success
def test_walk_to_goal_and_stop_succeeds(room):
    """Six 0.25 m steps along -z reach the goal 1.5 m ahead: reward -0.01 + 0.25 each, then STOP: success,
    reward -0.01 + 2.5, SPL = 1.5 / max(1.5, 1.5) = 1. (Per-step tolerances allow for the coarse geodesic
    grid: see test_distance_to_goal_is_zero_at_the_goal.)"""
    env = make_env([ep(0, (1.0, 3.0), (1.0, 1.5)), ep(1, (3.0, 3.0), (3.0, 1.0))], room)
    env.reset()
    d0 = env.start_distance.item()
    total = 0.0
    for k in range(6):
        r = steps(env, [MOVE_FORWARD])
        assert not r.done.any()
        assert r.reward.item() == pytest.approx(-0.01 + 0.25, abs=0.06)
        total += r.reward.item()
        np.testing.assert_allclose(r.obs["gps"][0], [0.25 * (k + 1), 0.0], atol=1e-5)
    assert r.obs["pointgoal_with_gps_compass"][0, 0].item() == pytest.approx(0.0, abs=1e-4)
    r = steps(env, [STOP])
    assert r.terminated.item() and not r.truncated.item()
    assert r.info["success"].item() == 1.0
    assert r.reward.item() == pytest.approx(-0.01 + 2.5, abs=1e-6)  # no move, so no progress term
    # the progress terms add up to start distance - final distance (both ~ 1.5 m and ~ 0)
    d_t = r.info["distance_to_goal"].item()
    assert total == pytest.approx(6 * -0.01 + d0 - d_t, abs=1e-4)
    assert d0 == pytest.approx(1.5, rel=0.03) and d_t < 0.1
    assert r.info["geodesic_distance"].item() == d0
    assert r.info["spl"].item() == pytest.approx(1.0, abs=0.02)
    assert r.info["softspl"].item() == pytest.approx(1.0 - d_t / d0, abs=1e-5)
    assert r.info["path_length"].item() == pytest.approx(1.5, abs=1e-4)
    assert r.info["steps"].item() == 7 and r.info["collisions"].item() == 0
    assert r.info["episode_index"].item() == 0


def test_distance_to_goal_is_zero_at_the_goal(room):
    env = make_env([ep(0, (1.0, 2.0), (1.0, 1.5))], room)
    env.reset()
    for _ in range(2):
        r = steps(env, [MOVE_FORWARD])
        assert r.reward.item() == pytest.approx(0.24, abs=0.02)
    assert (env.sim.x.item(), env.sim.z.item()) == pytest.approx((1.0, 1.5), abs=1e-5)
    assert env.sim.geodesic().item() < 0.02


def test_stop_far_from_goal_fails(room):
    env = make_env([ep(0, (3.0, 3.0), (3.0, 1.0))], room)
    env.reset()
    r = steps(env, [STOP])
    assert r.terminated.item() and not r.truncated.item()
    assert r.info["success"].item() == 0.0 and r.info["spl"].item() == 0.0
    assert r.reward.item() == pytest.approx(-0.01, abs=1e-6)
    assert r.info["softspl"].item() == pytest.approx(0.0, abs=0.02)  # no progress at all
    assert r.info["distance_to_goal"].item() == pytest.approx(2.0, rel=0.03)


def test_success_threshold_is_0_2_m(room):
    """Goal 0.1 m from the start: STOP succeeds; goal 0.3 m away: it fails (geodesic 0.3 > 0.2)."""
    env = make_env([ep(0, (2.0, 2.0), (2.0, 1.9)), ep(1, (2.0, 2.0), (2.0, 1.7))], room, num_envs=2)
    env.reset()
    r = steps(env, [STOP, STOP])
    assert r.info["success"].tolist() == [1.0, 0.0]
    assert r.reward[0].item() == pytest.approx(2.49, abs=1e-4)
    assert r.reward[1].item() == pytest.approx(-0.01, abs=1e-4)


def test_moving_away_is_penalised_and_collisions_count(room):
    env = make_env([ep(0, (2.0, 0.6), (2.0, 3.6))], room)  # facing -z: the goal is behind
    env.reset()
    r = steps(env, [MOVE_FORWARD])
    assert r.reward.item() == pytest.approx(-0.01 - 0.25, abs=0.01)
    collided = 0
    for _ in range(4):
        r = steps(env, [MOVE_FORWARD])
        collided += int(r.info["collided"].item())
    assert collided >= 2  # walked into the north wall
    r = steps(env, [STOP])
    assert r.info["collisions"].item() == collided
    assert r.info["spl"].item() == 0.0


def test_step_limit_truncates_and_auto_reset_keeps_final_obs(room):
    """max_episode_steps=5: five turns end the episode by truncation; ``final_obs`` shows the turned agent, ``obs``
    the next episode's first frame."""
    episodes = [ep(0, (1.0, 3.0), (1.0, 1.5)), ep(1, (3.0, 3.5), (3.0, 1.5), heading=1.0)]
    env = make_env(episodes, room, max_episode_steps=5)
    first = env.reset()
    for k in range(1, 6):
        r = steps(env, [TURN_LEFT])
        if k < 5:
            assert not r.done.any()
            assert torch.equal(r.final_obs["compass"], r.obs["compass"])
    assert r.truncated.item() and not r.terminated.item()
    assert r.info["success"].item() == 0.0 and r.info["steps"].item() == 5
    assert r.reward.item() == pytest.approx(-0.01, abs=1e-5)
    # final_obs: the ended episode, 50 degrees left of its start, goal 1.5 m away
    assert r.final_obs["compass"][0, 0].item() == pytest.approx(5 * TEN_DEG, abs=1e-5)
    np.testing.assert_allclose(r.final_obs["pointgoal_with_gps_compass"][0], [1.5, -5 * TEN_DEG], atol=1e-5)
    # obs: episode 1 from its start
    assert r.obs["compass"][0, 0].item() == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(r.obs["gps"][0], [0.0, 0.0], atol=1e-6)
    # heading 1 rad (left of -z) and the goal straight along -z: 1 rad to the agent's right
    np.testing.assert_allclose(r.obs["pointgoal_with_gps_compass"][0], [2.0, -1.0], atol=1e-5)
    assert env.current_episodes()[0].episode_id == "1"
    assert not torch.equal(r.obs["depth"], r.final_obs["depth"])
    assert not torch.equal(first["depth"], r.obs["depth"])


def test_exhausted_partition_deactivates_env(room):
    env = make_env([ep(0, (1.0, 3.0), (1.0, 1.5))], room)
    env.reset()
    r = steps(env, [STOP])
    assert r.terminated.item() and not r.info["active"].item()
    assert env.current_episodes() == [None]
    for _ in range(3):
        r = steps(env, [MOVE_FORWARD])  # ignored: nothing left to run
        assert not r.done.any() and r.reward.item() == 0.0


# ------------------------------------------------------------------------------------------- episode order
@pytest.mark.parametrize("num_envs", [1, 4, 7])
def test_partition_visits_each_episode_exactly_once(small_dataset, num_envs):
    episodes, navs = load_split(small_dataset, "val")
    env = make_env(episodes, navs, num_envs=num_envs, res=8, sensors=("depth",))
    env.reset()
    seen = []
    for _ in range(len(episodes) + 2):
        r = env.step(torch.full((num_envs,), STOP))
        seen += r.info["episode_index"][r.done].tolist()
        if not r.info["active"].any():
            break
    assert sorted(seen) == list(range(len(episodes)))
    assert not r.info["active"].any()


def test_shuffle_order_covers_each_episode_once_per_epoch(room):
    episodes = [ep(k, (1.0 + 0.2 * k, 3.0), (1.0 + 0.2 * k, 1.5)) for k in range(10)]
    env = make_env(episodes, room, order="shuffle", seed=5)
    env.reset()
    seen = [int(env.episode_index[0])]
    for _ in range(19):
        r = steps(env, [STOP])
        seen.append(int(env.episode_index[0]))
        assert r.info["active"].all()
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != list(range(10)) and seen[:10] != seen[10:]


# ------------------------------------------------------------------------------------------------- oracle
def test_oracle_reaches_the_goals(small_dataset):
    episodes, navs = load_split(small_dataset, "val")
    assert len(episodes) >= 30
    env = make_env(episodes, navs, num_envs=10, res=4, sensors=("depth",))
    oracle = ShortestPathFollower(env)
    env.reset()
    success, spls = [], []
    for _ in range(2000):
        r = env.step(oracle.act())
        success += r.info["success"][r.done].tolist()
        spls += r.info["spl"][r.done].tolist()
        if not r.info["active"].any():
            break
    assert len(success) == len(episodes)
    assert np.mean(success) >= 0.99
    assert np.mean(spls) >= 0.9, np.mean(spls)


# ------------------------------------------------------------------------------------------ determinism
def rollout(env, n_steps, seed):
    rng = np.random.default_rng(seed)
    out = [env.reset()]
    rewards = []
    for _ in range(n_steps):
        r = env.step(torch.from_numpy(rng.choice(4, size=env.num_envs, p=[0.05, 0.65, 0.15, 0.15])))
        out.append(r.obs)
        rewards.append(r.reward)
    return out, rewards


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_same_seed_same_observations_different_seed_differs(small_dataset):
    episodes, navs = load_split(small_dataset, "train")
    kw = dict(num_envs=2, res=12, sensors=("rgb", "depth"), order="shuffle")
    a, ra = rollout(make_env(episodes, navs, seed=3, **kw), 30, 0)
    b, rb = rollout(make_env(episodes, navs, seed=3, **kw), 30, 0)
    c, _ = rollout(make_env(episodes, navs, seed=4, **kw), 30, 0)
    assert same(a, b) and all(torch.equal(x, y) for x, y in zip(ra, rb))
    assert not torch.equal(a[0]["pointgoal_with_gps_compass"], c[0]["pointgoal_with_gps_compass"])
    assert not same(a, c)


def test_state_dict_resume_continues_identically(small_dataset):
    episodes, navs = load_split(small_dataset, "train")
    kw = dict(num_envs=3, res=12, sensors=("rgb", "depth"), order="shuffle", seed=1, max_episode_steps=15)
    env = make_env(episodes, navs, **kw)
    rng = np.random.default_rng(0)
    env.reset()
    act = lambda: torch.from_numpy(rng.choice(4, size=3, p=[0.05, 0.65, 0.15, 0.15]))  # noqa: E731
    for _ in range(23):
        r = env.step(act())
    state = env.state_dict()
    last_obs = r.obs
    actions = [act() for _ in range(20)]
    expected = [env.step(a) for a in actions]
    assert any(e.done.any() for e in expected)  # the continuation crosses episode boundaries

    fresh = make_env(episodes, navs, **kw)
    fresh.load_state_dict(state)
    obs = fresh.observe()
    for k in last_obs:
        assert torch.equal(obs[k], last_obs[k]), k
    for a, e in zip(actions, expected):
        r = fresh.step(a)
        assert torch.equal(r.reward, e.reward)
        assert torch.equal(r.terminated, e.terminated) and torch.equal(r.truncated, e.truncated)
        for k in e.obs:
            assert torch.equal(r.obs[k], e.obs[k]), k
            assert torch.equal(r.final_obs[k], e.final_obs[k]), k
        for k in ("success", "spl", "softspl", "path_length", "steps", "episode_index"):
            assert torch.equal(r.info[k], e.info[k]), k


def test_load_state_dict_rejects_wrong_env_count(small_dataset):
    episodes, navs = load_split(small_dataset, "val")
    a = make_env(episodes, navs, num_envs=2, res=8, sensors=("depth",))
    a.reset()
    b = make_env(episodes, navs, num_envs=3, res=8, sensors=("depth",))
    with pytest.raises(ValueError, match="3 environments"):
        b.load_state_dict(a.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_cpu_and_cuda_agree(small_dataset):
    episodes, navs = load_split(small_dataset, "val")
    kw = dict(num_envs=4, res=32, sensors=("rgb", "depth"), order="shuffle", seed=2)
    cpu = make_env(episodes, navs, device="cpu", kernels="torch", **kw)
    gpu = make_env(episodes, navs, device="cuda", **kw)
    a, b = cpu.reset(), gpu.reset()
    rng = np.random.default_rng(0)
    for step in range(40):
        for k in a:
            if k == "rgb":
                assert (a[k].int() - b[k].cpu().int()).abs().max() <= 1, (step, k)
            else:
                assert torch.allclose(a[k], b[k].cpu(), atol=1e-4), (step, k)
        actions = torch.from_numpy(rng.choice(4, size=4, p=[0.05, 0.65, 0.15, 0.15]))
        ra, rb = cpu.step(actions), gpu.step(actions.cuda())
        assert torch.allclose(ra.reward, rb.reward.cpu(), atol=1e-4)
        assert torch.equal(ra.done, rb.done.cpu())
        a, b = ra.obs, rb.obs
        assert torch.allclose(cpu.sim.x, gpu.sim.x.cpu(), atol=1e-4)


def observations_agree(key: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Twins' observations agree up to float32-vs-float64 arithmetic: poses drift apart by ~1e-6 m over an episode,
    which moves depth by up to ~0.3 mm, an RGB value by one level, and the compass across +-pi."""
    if key == "rgb":
        return (a.int() - b.int()).abs().max() <= 1
    if key == "compass":
        return bool((torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi).abs().max() < 1e-4)
    if key == "pointgoal_with_gps_compass":  # as a vector: the bearing is ill-conditioned near the goal
        xy = lambda g: torch.stack([g[:, 0] * torch.cos(g[:, 1]), g[:, 0] * torch.sin(g[:, 1])], 1)  # noqa: E731
        return torch.allclose(xy(a), xy(b), atol=1e-4)
    return torch.allclose(a, b, atol=1e-4)


def test_numba_and_torch_backends_agree_on_a_rollout(small_dataset):
    """The CPU stand-in for CPU-vs-CUDA: the torch kernels (what CUDA runs) against the compiled ones, for every
    output of a step (movement, sensors, the tally, reward and metrics, automatic resets)."""
    episodes, navs = load_split(small_dataset, "val")
    kw = dict(num_envs=6, res=16, sensors=("rgb", "depth"), order="shuffle", seed=2, max_episode_steps=40)
    a_env, b_env = make_env(episodes, navs, kernels="numba", **kw), make_env(episodes, navs, kernels="torch", **kw)
    assert (a_env.sim.kernels.name, b_env.sim.kernels.name) == ("numba", "torch")
    a, b = a_env.reset(), b_env.reset()
    rng = np.random.default_rng(0)
    outcomes = {"success": 0, "truncated": 0, "failed stop": 0}
    for step in range(160):
        for k in a:
            assert observations_agree(k, a[k], b[k]), (step, k)
        # half the envs follow the shortest path (and so reach and STOP at goals), half walk at random
        actions = torch.from_numpy(rng.choice(4, size=6, p=[0.02, 0.68, 0.15, 0.15]))
        actions[::2] = a_env.oracle_actions()[::2]
        ra, rb = a_env.step(actions), b_env.step(actions)
        assert torch.allclose(ra.reward, rb.reward, atol=1e-5), step
        assert torch.equal(ra.terminated, rb.terminated) and torch.equal(ra.truncated, rb.truncated), step
        assert ra.info.keys() == rb.info.keys()
        for k in ra.info:
            assert ra.info[k].dtype == rb.info[k].dtype, k
            if ra.info[k].is_floating_point():
                assert torch.allclose(ra.info[k], rb.info[k], atol=1e-4), (step, k)
            else:
                assert torch.equal(ra.info[k], rb.info[k]), (step, k)
        for k in ra.final_obs:
            assert observations_agree(k, ra.final_obs[k], rb.final_obs[k]), (step, k)
        outcomes["success"] += int(ra.info["success"][ra.terminated].sum())
        outcomes["failed stop"] += int((ra.info["success"][ra.terminated] == 0).sum())
        outcomes["truncated"] += int(ra.truncated.sum())
        a, b = ra.obs, rb.obs
    assert all(v >= 2 for v in outcomes.values()), outcomes


@pytest.mark.parametrize("kernels", sorted(IMPLEMENTATIONS))
def test_pointnav_step_hand_cases(kernels):
    """Reward, success, SPL and SoftSPL of one step, by hand, for both twins: a success, STOP just outside the 0.2 m
    radius, a step away, an inactive env, and an unreachable goal (infinite distance: no progress reward)."""
    task = TaskConfig()
    stop = torch.tensor([True, True, False, False, False])
    active = torch.tensor([True, True, True, False, True])
    prev = torch.tensor([0.3, 0.45, 2.0, 1.0, math.inf])
    now = torch.tensor([0.1, 0.2, 2.25, 1.0, math.inf])
    start = torch.tensor([4.0, 4.0, 4.0, 4.0, 4.0])
    path = torch.tensor([5.0, 3.0, 2.0, 0.0, 1.0])
    reward, m = select_kernels(kernels, "cpu").pointnav_step(task, stop, active, prev, now, start, path)
    np.testing.assert_allclose(reward.numpy(), [-0.01 + 0.2 + 2.5, -0.01 + 0.25, -0.01 - 0.25, 0.0, -0.01], atol=1e-6)
    np.testing.assert_array_equal(m["success"].numpy(), [1, 0, 0, 0, 0])
    np.testing.assert_allclose(m["spl"].numpy(), [0.8, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(m["softspl"].numpy(), [0.975 * 0.8, 0.95, 0.4375, 0.75, 0.0], atol=1e-6)
    np.testing.assert_array_equal(m["distance_to_goal"].numpy(), now.numpy())
    # a degenerate episode (start on the goal, nothing walked) gives NaN metrics in both twins, not an exception
    zero = torch.zeros(1)
    pointnav_step = select_kernels(kernels, "cpu").pointnav_step
    reward, m = pointnav_step(task, torch.tensor([True]), torch.tensor([True]), zero, zero, zero, zero)
    assert reward.item() == pytest.approx(-0.01 + 2.5) and m["success"].item() == 1.0
    assert math.isnan(m["spl"].item()) and math.isnan(m["softspl"].item())


@pytest.mark.parametrize("kernels", sorted(IMPLEMENTATIONS))
def test_tally_hand_cases(kernels):
    """Counters and episode ends, by hand, for both twins: STOP terminates, the step limit truncates, an inactive
    env counts nothing (not even a collision reported for it)."""
    task = TaskConfig(max_episode_steps=10)
    actions = torch.tensor([STOP, MOVE_FORWARD, MOVE_FORWARD, STOP])
    active = torch.tensor([True, True, True, False])
    collided = torch.tensor([False, True, False, True])
    moved = torch.tensor([0.0, 0.1, 0.25, 0.0])
    steps, path, collisions = torch.tensor([3, 9, 4, 7]), torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([0, 2, 0, 1])
    tally = select_kernels(kernels, "cpu").tally
    stop, terminated, truncated = tally(task, actions, active, collided, moved, steps, path, collisions)
    assert stop.tolist() == terminated.tolist() == [True, False, False, False]
    assert truncated.tolist() == [False, True, False, False]
    assert steps.tolist() == [4, 10, 5, 7] and collisions.tolist() == [0, 3, 0, 1]
    assert collided.tolist() == [False, True, False, False]
    np.testing.assert_allclose(path.numpy(), [1.0, 2.1, 0.75, 3.0])


def test_episode_off_the_navigable_floor_is_rejected(room):
    good, bad = ep(6, (2.0, 2.0), (3.0, 2.0)), ep(7, (0.05, 2.0), (2.0, 2.0))  # the bad start: in the west wall
    with pytest.raises(ValueError) as err:  # at construction, before any environment reaches it
        make_env([good, bad], room)
    assert "episode 1 (id '7')" in str(err.value) and "'start_position'" in str(err.value) and "room" in str(err.value)


# ------------------------------------------------------------------------------------------------ metrics
def test_spl_hand_cases():
    s = torch.tensor([1.0, 1.0, 0.0, 1.0])
    l = torch.tensor([5.0, 5.0, 5.0, 4.0])
    p = torch.tensor([5.0, 10.0, 5.0, 3.0])  # optimal, twice as long, failed, shorter than l (interpolation)
    np.testing.assert_allclose(spl(s.bool(), l, p).numpy(), [1.0, 0.5, 0.0, 1.0])


def test_softspl_hand_cases():
    d_t = torch.tensor([0.0, 1.0, 6.0, 2.0])
    l = torch.tensor([4.0, 4.0, 4.0, 4.0])
    p = torch.tensor([4.0, 8.0, 3.0, 5.0])
    # max(0, 1 - d_T / l) * l / max(p, l): 1 * 1; 0.75 * 0.5; 0 (moved away); 0.5 * 0.8
    np.testing.assert_allclose(soft_spl(d_t, l, p).numpy(), [1.0, 0.375, 0.0, 0.4])


def test_reward_hand_cases():
    prev = torch.tensor([3.0, 3.0, 0.15, 2.0, float("inf")])
    now = torch.tensor([2.75, 3.25, 0.15, 2.0, float("inf")])
    success = torch.tensor([False, False, True, False, False])
    np.testing.assert_allclose(pointnav_reward(prev, now, success).numpy(),
                               [-0.01 + 0.25, -0.01 - 0.25, -0.01 + 2.5, -0.01, -0.01], atol=1e-6)


def test_episode_check_names_the_first_bad_episode_across_scenes(make_scene):
    navs = {name: NavGrid(make_scene(np.zeros((84, 84), np.uint8), name=name)) for name in ("a", "b")}
    eps = [ep(0, (2.0, 2.0), (3.0, 2.0), scene="a"), ep(1, (2.0, 2.0), (3.0, 3.0), scene="b"),
           ep(2, (2.0, 2.0), (3.0, 3.0), scene="a")]
    check_episodes_in_scenes(eps, navs, lambda k: f"ep {k}")  # all good: no error
    off_floor = Episode("3", "b", (2.0, 0.0, 2.0), eps[0].start_rotation, (3.0, 1.2, 3.0), 1.0)
    in_wall = ep(4, (2.0, 2.0), (4.15, 2.0), scene="a")
    with pytest.raises(ValueError, match=r"ep 3 \(id '3'\): field 'goals\[0\].position' y=1.2 is not on the floor"):
        check_episodes_in_scenes([*eps, off_floor, in_wall], navs, lambda k: f"ep {k}")
    wall = r"ep 3 \(id '4'\): field 'goals\[0\].position' \(4.15, 2.00\) is not navigable in scene 'a'"
    with pytest.raises(ValueError, match=wall):
        check_episodes_in_scenes([*eps, in_wall, off_floor], navs, lambda k: f"ep {k}")


def test_host_views_write_rows_like_put_rows():
    """HostViews.put writes through the numpy view it made of a registered tensor, and a tensor it was not given (or
    an attribute replaced since) through put_rows: the same rows either way, never into a stale tensor."""
    registered = torch.zeros(5)
    host = HostViews(registered)
    host.put(registered, [1, 3], torch.tensor([2.5, -1.0]))
    host.put(registered, torch.tensor([4]), 7)
    assert registered.tolist() == [0.0, 2.5, 0.0, -1.0, 7.0]
    assert host.view(registered).base is not None and host.view(registered)[1] == 2.5
    replacement = torch.zeros(5, dtype=torch.long)  # another tensor: not registered, put_rows' path
    host.put(replacement, [0, 2], [3, 4])
    assert replacement.tolist() == [3, 0, 4, 0, 0] and registered.tolist() == [0.0, 2.5, 0.0, -1.0, 7.0]
    expected = torch.zeros(2, 3)
    put_rows(expected, [1], torch.tensor([[1.0, 2.0, 3.0]]))
    rows = torch.zeros(2, 3)
    HostViews(rows).put(rows, 1, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(rows, expected) and expected.tolist() == [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]
