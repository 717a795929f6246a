"""gymnasium front-ends: ``gymnasium.make("ddppo/PointNav-v0")`` and ``PointNavGymVectorEnv``."""

from __future__ import annotations

import math
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import ddppo  # noqa: F401  (registers ddppo/PointNav-v0)
from ddppo.sim.geometry import MOVE_FORWARD, STOP, TURN_LEFT
from ddppo.sim.gym_env import PointNavEnv, PointNavGymVectorEnv
from ddppo.sim.topdown import AGENT, GOAL

INFO_KEYS = {"agent_position", "agent_rotation", "goal_position", "distance_to_goal", "success", "spl"}


@pytest.fixture
def env(small_dataset):
    e = gymnasium.make("ddppo/PointNav-v0", split="val", data_dir=str(small_dataset), resolution=32)
    yield e
    e.close()


def test_make_passes_the_env_checker(env):
    assert isinstance(env.unwrapped, PointNavEnv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the goal sensor's unbounded Box draws a warning, nothing more
        check_env(env.unwrapped)


def test_spaces(env):
    space = env.observation_space
    assert set(space.spaces) == {"rgb", "depth", "pointgoal_with_gps_compass", "gps", "compass"}
    assert space["rgb"].shape == (32, 32, 3) and space["rgb"].dtype == np.uint8
    assert space["depth"].shape == (32, 32, 1) and space["depth"].dtype == np.float32
    assert space["depth"].low.min() == 0.0 and space["depth"].high.max() == 1.0
    assert env.action_space == gymnasium.spaces.Discrete(4)


def check_info(info, obs):
    assert INFO_KEYS <= set(info), INFO_KEYS - set(info)
    pos, rot, goal = info["agent_position"], info["agent_rotation"], info["goal_position"]
    assert pos.shape == (3,) and rot.shape == (4,) and goal.shape == (3,)
    assert pos[1] == 0.0 and goal[1] == 0.0
    assert rot[0] == 0.0 and rot[2] == 0.0 and np.linalg.norm(rot) == pytest.approx(1.0, abs=1e-6)
    # the goal sensor is the goal seen from the agent's pose in info
    theta = 2 * math.atan2(rot[1], rot[3])
    dx, dz = goal[0] - pos[0], goal[2] - pos[2]
    c, s = math.cos(theta), math.sin(theta)
    ax, az = dx * c - dz * s, dx * s + dz * c
    rho, phi = obs["pointgoal_with_gps_compass"]
    assert rho == pytest.approx(math.hypot(dx, dz), abs=1e-4)
    assert phi == pytest.approx(-math.atan2(ax, -az), abs=1e-4)
    # a path is never shorter than the straight line
    assert info["distance_to_goal"] >= rho * 0.97 - 0.02


def test_info_and_observations_through_an_episode(env):
    obs, info = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    check_info(info, obs)
    assert info["success"] == 0.0 and info["spl"] == 0.0
    start = info["agent_position"].copy()
    for action in (MOVE_FORWARD, TURN_LEFT, MOVE_FORWARD):
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs)
        assert not terminated and not truncated
        assert isinstance(reward, float) and -0.3 < reward < 0.3
        check_info(info, obs)
    moved = np.linalg.norm(info["agent_position"] - start)
    assert moved <= 0.5 + 1e-5
    np.testing.assert_allclose(np.linalg.norm(obs["gps"]), moved, atol=1e-4)
    obs, reward, terminated, truncated, info = env.step(STOP)
    assert terminated and not truncated
    assert reward == pytest.approx(-0.01 + 2.5 * info["success"], abs=1e-6)
    assert info["success"] in (0.0, 1.0) and 0.0 <= info["spl"] <= 1.0


def test_info_keys_on_the_final_step(env):
    obs, info = env.reset(seed=2)
    goal = info["goal_position"].copy()
    obs, _, terminated, _, info = env.step(STOP)
    assert terminated
    assert INFO_KEYS <= set(info), INFO_KEYS - set(info)
    np.testing.assert_array_equal(info["goal_position"], goal)


def test_agent_position_on_a_truncating_move(small_dataset):
    # built directly: gymnasium.make would take max_episode_steps for its own TimeLimit wrapper
    env = PointNavEnv(split="val", data_dir=str(small_dataset), resolution=8, max_episode_steps=1)
    for seed in range(10):
        _, info = env.reset(seed=seed)
        start = info["agent_position"].copy()
        obs, _, terminated, truncated, info = env.step(MOVE_FORWARD)
        assert truncated and not terminated
        walked = float(np.linalg.norm(obs["gps"]))  # the final observation: where the move ended
        if walked > 0.2:
            break
    else:
        pytest.fail("no unobstructed first step in 10 seeds")
    assert np.linalg.norm(info["agent_position"] - start) == pytest.approx(walked, abs=1e-4)


def test_reset_with_seed_is_deterministic(env):
    a, ia = env.reset(seed=5)
    env.step(MOVE_FORWARD)
    b, ib = env.reset(seed=5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(ia["goal_position"], ib["goal_position"])
    c, ic = env.reset(seed=6)
    assert not np.array_equal(ic["goal_position"], ia["goal_position"])


def test_reset_after_an_episode_starts_the_next_one(env):
    _, info0 = env.reset(seed=0)
    env.step(STOP)
    obs, info1 = env.reset()
    assert not np.array_equal(info0["goal_position"], info1["goal_position"])
    np.testing.assert_allclose(obs["gps"], [0.0, 0.0], atol=1e-6)
    assert obs["compass"][0] == pytest.approx(0.0, abs=1e-6)
    check_info(info1, obs)


def test_truncation_at_the_step_limit(small_dataset):
    env = PointNavEnv(split="val", data_dir=str(small_dataset), resolution=8, max_episode_steps=4)
    obs, _ = env.reset(seed=0)
    for k in range(4):
        obs, reward, terminated, truncated, info = env.step(TURN_LEFT)
        assert not terminated and truncated == (k == 3)
    assert obs["compass"][0] == pytest.approx(math.radians(40), abs=1e-5)  # the ended episode's last frame
    assert info["success"] == 0.0
    obs, _ = env.reset()
    assert obs["compass"][0] == pytest.approx(0.0, abs=1e-6)




def test_reset_mid_episode_starts_a_new_episode(env):
    env.reset(seed=0)
    for _ in range(3):
        env.step(MOVE_FORWARD)
    env.step(TURN_LEFT)
    obs, info = env.reset()
    np.testing.assert_allclose(obs["gps"], [0.0, 0.0], atol=1e-6)
    assert obs["compass"][0] == pytest.approx(0.0, abs=1e-6)


def test_time_limit_wrapper_truncation_then_reset(small_dataset):
    """``gymnasium.make(..., max_episode_steps=2)`` wraps the env in TimeLimit (make keeps that argument)."""
    env = gymnasium.make("ddppo/PointNav-v0", split="val", data_dir=str(small_dataset), resolution=8,
                         max_episode_steps=2)
    env.reset(seed=0)
    env.step(TURN_LEFT)
    *_, truncated, _ = env.step(TURN_LEFT)
    assert truncated
    obs, _ = env.reset()
    assert obs["compass"][0] == pytest.approx(0.0, abs=1e-6)


def test_render_returns_an_rgb_top_down_map(env):
    env.reset(seed=0)
    for a in (MOVE_FORWARD, MOVE_FORWARD, TURN_LEFT, MOVE_FORWARD):
        env.step(a)
    img = env.render()
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= 50
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert GOAL in colours and AGENT in colours


# -------------------------------------------------------------------------------------------------- vector
def test_gym_vector_env_steps_and_returns_final_obs(small_dataset):
    venv = PointNavGymVectorEnv(num_envs=3, split="val", data_dir=str(small_dataset), resolution=16,
                                sensors=("depth",), max_episode_steps=3, seed=0)
    obs, infos = venv.reset(seed=4)
    assert venv.observation_space.contains(obs)
    assert obs["depth"].shape == (3, 16, 16, 1) and obs["pointgoal_with_gps_compass"].shape == (3, 2)
    actions = np.array([STOP, TURN_LEFT, TURN_LEFT])
    obs, rewards, terminated, truncated, infos = venv.step(actions)
    assert venv.observation_space.contains(obs)
    assert rewards.shape == (3,) and rewards.dtype == np.float32
    assert terminated.tolist() == [True, False, False] and not truncated.any()
    assert infos["episode_done"].tolist() == [True, False, False]
    final = infos["final_obs"]
    assert set(final) == set(obs)
    # env 0 ended: new episode in obs, the stopped one in final_obs; the others: identical
    assert not np.array_equal(final["pointgoal_with_gps_compass"][0], obs["pointgoal_with_gps_compass"][0])
    for k in obs:
        np.testing.assert_array_equal(final[k][1:], obs[k][1:])
    for _ in range(2):
        obs, rewards, terminated, truncated, infos = venv.step(np.array([TURN_LEFT] * 3))
    assert truncated.tolist() == [False, True, True]
    np.testing.assert_allclose(infos["final_obs"]["compass"][1:, 0], math.radians(30), atol=1e-5)
    np.testing.assert_allclose(obs["compass"][1:, 0], 0.0, atol=1e-6)
    assert set(infos) >= {"success", "spl", "distance_to_goal", "collided", "final_obs"}
