"""The behaviour every simulator backend must show, as one suite run on each of them.

- ``embedded``: ddppo's own batched simulator (PointNavVectorEnv), as ``make_vector_env`` builds it;
- ``embedded-workers``: the habitat backend's code path (WorkerVectorEnv: worker processes, the pipe protocol,
  the task code in the main process) with the embedded simulator in the workers;
- ``habitat``: habitat-sim through ``make_vector_env`` with ``sim.backend=habitat``, on the embedded suite's own
  val scenes and episodes exported as meshes (``ddppo scene export``, the ``habitat_exported_dataset`` fixture).
  ``DDPPO_HABITAT_TEST_SCENE`` overrides the scenes: a scene with its navmesh beside it (habitat's test scene
  ``skokloster-castle.glb``, say), with episodes drawn on that navmesh or read from the json.gz named by
  ``DDPPO_HABITAT_TEST_EPISODES`` (scene ids relative to the scene's directory). Skipped, with the reason, where
  habitat-sim does not import (failed instead under DDPPO_REQUIRE_SYSTEM, as in CI).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from habitat_support import need_habitat

from ddppo.config import load_config
from ddppo.sim.dataset import Episode, load_episodes, save_episodes
from ddppo.sim.dataset_dir import episodes_path
from ddppo.sim.environments import make_vector_env
from ddppo.sim.geometry import MOVE_FORWARD, STOP, TURN_LEFT, TURN_RIGHT, heading_to_quaternion
from ddppo.sim.worker_env import EmbeddedWorkerSim, WorkerVectorEnv

BACKENDS = ["embedded", "embedded-workers", "habitat"]
TEN_DEG = math.radians(10)


@dataclass
class Backend:
    name: str
    make: object
    """(num_envs, seed=0, order="shuffle", episode_ids=None, max_episode_steps=500) -> vector env"""
    num_episodes: int
    shortest: list[int]
    """Episode indices, shortest geodesic distance first (oracle runs stay short)."""


def _overrides(data_dir, max_episode_steps: int) -> list[str]:
    return [f"task.data_dir={data_dir}", "task.split=val", "task.generate_if_missing=false", "sim.resolution=16",
            "sim.sensors=[rgb,depth]", f"task.max_episode_steps={max_episode_steps}"]


def _habitat_episodes(scene: Path, n: int, seed: int) -> list[Episode]:
    """Episodes on the scene's navmesh by habitat's generator rules (one floor, geodesic in [1, 10] m)."""
    import habitat_sim

    pf = habitat_sim.PathFinder()
    pf.load_nav_mesh(str(scene.with_suffix(".navmesh")))
    pf.seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(10_000):
        if len(out) == n:
            break
        a, b = np.asarray(pf.get_random_navigable_point()), np.asarray(pf.get_random_navigable_point())
        path = habitat_sim.ShortestPath()
        path.requested_start, path.requested_end = a, b
        if not pf.find_path(path) or not 1.0 <= path.geodesic_distance <= 10.0 or abs(a[1] - b[1]) > 0.5:
            continue
        out.append(Episode(str(len(out)), scene.name, tuple(map(float, a)),
                           tuple(heading_to_quaternion(rng.uniform(0, 2 * math.pi))), tuple(map(float, b)),
                           float(path.geodesic_distance)))
    assert len(out) == n, f"found only {len(out)} episodes on {scene}"
    return out


def _habitat_data(request, tmp_path_factory) -> tuple[Path, Path]:
    """(task.data_dir, task.scenes_dir) of the habitat backend: the exported small dataset, or the scene named by
    DDPPO_HABITAT_TEST_SCENE with episodes drawn on its navmesh (or read from DDPPO_HABITAT_TEST_EPISODES)."""
    given_scene = os.environ.get("DDPPO_HABITAT_TEST_SCENE")
    if not given_scene:
        exported = request.getfixturevalue("habitat_exported_dataset")
        return exported, exported
    scene = Path(given_scene)
    if not scene.is_file() or not scene.with_suffix(".navmesh").is_file():
        pytest.fail(f"DDPPO_HABITAT_TEST_SCENE={given_scene} does not name a scene with its .navmesh beside it",
                    pytrace=False)
    data = tmp_path_factory.mktemp("habitat_pointnav")
    given = os.environ.get("DDPPO_HABITAT_TEST_EPISODES")
    save_episodes(load_episodes(given) if given else _habitat_episodes(scene, 12, 0), episodes_path(data, "val"))
    return data, scene.parent


@pytest.fixture(params=BACKENDS)
def backend(request, small_dataset, tmp_path_factory):
    made = []

    def keep(env):
        made.append(env)
        return env

    name = request.param
    data = small_dataset
    if name == "habitat":
        need_habitat()
        data, scenes_dir = _habitat_data(request, tmp_path_factory)

        def make(num_envs, seed=0, order="shuffle", episode_ids=None, max_episode_steps=500):
            cfg = load_config(None, [*_overrides(data, max_episode_steps), "sim.backend=habitat",
                                     f"task.scenes_dir={scenes_dir}", "sim.resolution=64"])
            return keep(make_vector_env(cfg, "val", num_envs, seed=seed, order=order, episode_ids=episode_ids))

    elif name == "embedded-workers":
        def make(num_envs, seed=0, order="shuffle", episode_ids=None, max_episode_steps=500):
            cfg = load_config(None, _overrides(small_dataset, max_episode_steps))
            eps = load_episodes(episodes_path(small_dataset, "val"))
            eps = eps if episode_ids is None else [eps[k] for k in episode_ids]
            settings = dict(scenes_dir=str(small_dataset / "scenes"), store_dir=str(small_dataset / "geodesic" / "val"),
                            resolution=16, sensors=["rgb", "depth"], kernels="torch")
            return keep(WorkerVectorEnv(eps, num_envs, cfg.sim, cfg.task, EmbeddedWorkerSim, [settings] * num_envs,
                                        seed=seed, order=order))

    else:
        def make(num_envs, seed=0, order="shuffle", episode_ids=None, max_episode_steps=500):
            cfg = load_config(None, _overrides(small_dataset, max_episode_steps))
            return keep(make_vector_env(cfg, "val", num_envs, seed=seed, order=order, episode_ids=episode_ids))

    # read from the file rather than from an environment: a habitat environment costs a simulator start
    eps = load_episodes(episodes_path(data, "val"))
    yield Backend(name, make, len(eps), sorted(range(len(eps)), key=lambda k: eps[k].geodesic_distance))
    for env in made:
        env.close()


def walk(env, actions):
    return env.step(torch.as_tensor(actions, dtype=torch.long).reshape(-1))


def wrapped(a):
    return (np.asarray(a) + math.pi) % (2 * math.pi) - math.pi


# ------------------------------------------------------------------------------------------- observations
def test_observation_spaces_and_ranges(backend):
    env = backend.make(2)
    obs = env.reset()
    assert set(obs) == set(env.obs_spaces) >= {"pointgoal_with_gps_compass", "gps", "compass"}
    rng = np.random.default_rng(0)
    for t in range(12):
        for key, (shape, dtype) in env.obs_spaces.items():
            assert obs[key].shape == (2, *shape) and obs[key].dtype == dtype, key
        if "depth" in obs:
            assert 0.0 <= float(obs["depth"].min()) and float(obs["depth"].max()) <= 1.0
        goal = obs["pointgoal_with_gps_compass"]
        assert torch.isfinite(goal).all() and (goal[:, 0] >= 0).all() and (goal[:, 1].abs() <= math.pi + 1e-6).all()
        assert (obs["compass"].abs() <= math.pi + 1e-6).all()
        if t == 0:  # the start frame: GPS and compass read zero
            assert torch.equal(obs["gps"], torch.zeros(2, 2)) and torch.equal(obs["compass"], torch.zeros(2, 1))
        obs = walk(env, rng.choice([MOVE_FORWARD, TURN_LEFT, TURN_RIGHT], size=2)).obs


def test_pointgoal_is_the_goal_in_the_agent_frame(backend):
    """docs/design.md, "Task semantics": d = R^-1 (goal - pos), rho = |(-d_z, d_x)|, phi = atan2(d_x, -d_z),
    observed as [rho, -phi]."""
    env = backend.make(2)
    env.reset()
    rng = np.random.default_rng(1)
    for _ in range(10):
        r = walk(env, rng.choice([MOVE_FORWARD, TURN_LEFT, TURN_RIGHT], size=2))
        i = r.info
        gx, gz = (i["goal_x"] - i["agent_x"]).double(), (i["goal_z"] - i["agent_z"]).double()
        th = i["agent_theta"].double()
        dx, dz = gx * torch.cos(th) - gz * torch.sin(th), gx * torch.sin(th) + gz * torch.cos(th)  # R(-theta)
        expected = torch.stack([torch.hypot(-dz, dx), -torch.atan2(dx, -dz)], dim=1)
        assert torch.allclose(r.final_obs["pointgoal_with_gps_compass"].double(), expected, atol=1e-4)


# ------------------------------------------------------------------------------------------- actions
def test_forward_moves_0_25_m_unless_blocked_and_turns_are_10_degrees(backend):
    env = backend.make(1, seed=2)
    obs = env.reset()
    rng = np.random.default_rng(2)
    free_moves = 0
    for _ in range(40):
        a = int(rng.choice([MOVE_FORWARD, MOVE_FORWARD, TURN_LEFT, TURN_RIGHT]))
        r = walk(env, [a])
        before, after = obs, r.final_obs
        moved = float(torch.linalg.vector_norm(after["gps"][0] - before["gps"][0]))
        turned = float(wrapped(float(after["compass"][0, 0] - before["compass"][0, 0])))
        if a == MOVE_FORWARD:
            assert abs(turned) < 1e-5
            if r.info["collided"][0]:
                assert moved <= 0.25 + 1e-4
            elif backend.name == "habitat" and moved > 0.25 + 1e-3:
                # habitat-sim flags a collision only where its navmesh shortens the step; a step that slides round
                # an obstacle's corner ends at the navmesh point nearest the blocked target, which can lie farther
                # than the step (0.259 m on the exported val scenes), unflagged (docs/scene_export.md)
                assert moved < 0.3
            else:
                assert moved == pytest.approx(0.25, abs=1e-3)
                free_moves += 1
        else:
            assert moved < 1e-5 and not r.info["collided"][0]
            assert turned == pytest.approx(TEN_DEG if a == TURN_LEFT else -TEN_DEG, abs=1e-4)
        assert not r.done[0]
        obs = r.obs
    assert free_moves > 0


# ------------------------------------------------------------------------------------------- task
def test_oracle_path_reduces_geodesic_distance_and_rewards_follow_the_definition(backend):
    n = min(4, backend.num_episodes)
    env = backend.make(2, order="partition", episode_ids=backend.shortest[:n])
    env.reset()
    prev, live = None, torch.ones(2, dtype=torch.bool)
    ended = []
    for _ in range(3000):
        r = walk(env, env.oracle_actions())  # the backend's shortest-path follower
        i = r.info
        d = i["distance_to_goal"]
        prev = torch.where(i["steps"] == 1, i["geodesic_distance"], prev if prev is not None else d)
        # the shortest-path follower never walks away from the goal (turns leave the distance unchanged)
        assert (d[live] <= prev[live] + 0.02).all(), (d, prev)
        expected = -0.01 + (prev - d) + 2.5 * i["success"]
        assert torch.allclose(r.reward[live], expected[live], atol=1e-5)
        for e in r.done.nonzero().flatten().tolist():
            ended.append({k: float(v[e]) for k, v in i.items()})
        prev, live = d, i["active"]
        if not i["active"].any():
            break
    assert len(ended) == n
    for m in ended:
        l_, p, dT = m["geodesic_distance"], m["path_length"], m["distance_to_goal"]
        assert m["success"] == float(dT < 0.2) == 1.0
        assert m["spl"] == pytest.approx(l_ / max(p, l_), abs=1e-5)
        assert m["softspl"] == pytest.approx(max(0.0, 1 - dT / l_) * l_ / max(p, l_), abs=1e-5)


def test_stop_at_the_start_fails_and_starts_the_next_episode(backend):
    env = backend.make(2)
    env.reset()
    r = walk(env, [STOP, STOP])
    i = r.info
    assert r.terminated.all() and not r.truncated.any()
    assert set(env.episode_metrics) | set(env.record_metrics) <= set(i)
    assert torch.equal(i["success"], torch.zeros(2)) and torch.equal(i["spl"], torch.zeros(2))
    assert torch.allclose(i["softspl"], torch.zeros(2), atol=1e-6)
    assert torch.allclose(r.reward, torch.full((2,), -0.01), atol=1e-6)
    assert torch.equal(i["steps"], torch.ones(2, dtype=torch.long)) and torch.equal(i["path_length"], torch.zeros(2))
    assert torch.equal(r.obs["gps"], torch.zeros(2, 2))


def test_step_limit_truncates_and_the_final_observation_is_kept(backend):
    env = backend.make(2, max_episode_steps=3)
    env.reset()
    for k in range(3):
        r = walk(env, [TURN_LEFT, TURN_LEFT])
        assert bool(r.truncated.all()) == (k == 2) and not r.terminated.any()
    assert torch.allclose(r.final_obs["compass"], torch.full((2, 1), float(wrapped(3 * TEN_DEG))), atol=1e-4)
    assert torch.equal(r.obs["compass"], torch.zeros(2, 1)) and torch.equal(r.info["steps"], torch.full((2,), 3))


def test_partition_runs_every_episode_once_then_deactivates(backend):
    n = min(5, backend.num_episodes)
    env = backend.make(2, order="partition", episode_ids=list(range(n)))
    env.reset()
    seen = []
    for _ in range(n + 2):
        r = walk(env, [STOP, STOP])
        seen += r.info["episode_index"][r.done].tolist()
        if not r.info["active"].any():
            break
    assert sorted(seen) == list(range(n)) and not r.info["active"].any()
    r = walk(env, [MOVE_FORWARD, MOVE_FORWARD])
    assert not r.done.any() and torch.equal(r.reward, torch.zeros(2))


# ------------------------------------------------------------------------------------------- seeding, resume
def _rollout(env, steps, seed=0):
    rng = np.random.default_rng(seed)
    out = [env.reset()]
    rewards = []
    for _ in range(steps):
        r = walk(env, rng.choice(4, size=env.num_envs, p=[0.05, 0.65, 0.15, 0.15]))
        out.append(r.obs)
        rewards.append(r.reward)
    return out, rewards


def test_same_seed_same_rollout_other_seed_other_episodes(backend):
    a, ra = _rollout(backend.make(2, seed=3), 12)
    b, rb = _rollout(backend.make(2, seed=3), 12)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert all(torch.equal(x, y) for x, y in zip(ra, rb))
    starts = set()
    for seed in (3, 4, 5):  # the seed picks the episode stream
        env = backend.make(2, seed=seed)
        env.reset()
        starts.add(tuple(int(k) for k in env.episode_index))
    assert len(starts) > 1


def test_state_dict_resume_continues_identically(backend):
    env = backend.make(2, seed=1, max_episode_steps=8)
    rng = np.random.default_rng(0)
    env.reset()
    for _ in range(5):
        walk(env, rng.choice(4, size=2, p=[0.05, 0.65, 0.15, 0.15]))
    state = env.state_dict()
    actions = [rng.choice(4, size=2, p=[0.05, 0.65, 0.15, 0.15]) for _ in range(6)]
    first = [walk(env, a) for a in actions]
    other = backend.make(2, seed=1, max_episode_steps=8)
    other.load_state_dict(state)
    other.observe()
    for a, r in zip(actions, first):
        s = walk(other, a)
        # to the bit: a resumed run must continue exactly as the uninterrupted one
        assert torch.equal(s.reward, r.reward) and torch.equal(s.done, r.done)
        for k in r.obs:
            assert torch.equal(s.obs[k], r.obs[k]), k
