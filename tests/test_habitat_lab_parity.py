"""habitat-lab as the oracle: ddppo's PointNav on the habitat backend against a real ``habitat.Env`` built from
habitat-lab's own PointNav benchmark config, on the same scenes (habitat-sim's simple_room.glb, and the embedded
val scenes exported for habitat-sim, each with the navmesh habitat-sim computes for our agent), the same episodes and
the same actions, compared step by step: the pose,
``DistanceToGoal``, ``PointGoalWithGPSCompassSensor`` (the raw polar goal vector), the episodic GPS and compass,
``Collisions``, the reward's distance term (``DistanceToGoalReward``) and, at each episode's end, ``Success``,
``SPL`` and ``SoftSPL``. Also habitat-lab's ``EpisodeIterator`` against ddppo's scene-grouped episode order.

Runs wherever habitat-sim and habitat-lab import (tests/habitat_lab_support.py); CI has both. Measured with
habitat-sim 0.3.3 and habitat-lab 0.3.320260507 (simple_room: 8 episodes, 308 steps; exported scenes: 10 episodes,
512 steps): positions and distances to the goal identical, headings, goal vectors, GPS and compass equal to float32
rounding (largest differences 1.2e-7 rad, 9.5e-7, 4.8e-7 m, 3.6e-7 rad), collisions and success exactly, SPL and
SoftSPL within 1.6e-7; the tolerances below leave at least a factor of ten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from habitat_lab_support import habitat_test_scene, navmesh_for, need_habitat_lab

from ddppo.config import load_config
from ddppo.sim.dataset import Episode, load_episodes, save_episodes
from ddppo.sim.dataset_dir import episodes_path
from ddppo.sim.environments import make_vector_env
from ddppo.sim.episode_order import SceneGroupedIterator
from ddppo.sim.geometry import MOVE_FORWARD, STOP, TURN_LEFT, TURN_RIGHT, heading_to_quaternion

N_EPISODES = 8
MAX_STEPS = 80
RESOLUTION = 16
ACTION_NAMES = {STOP: "stop", MOVE_FORWARD: "move_forward", TURN_LEFT: "turn_left", TURN_RIGHT: "turn_right"}
POLICIES = ("oracle", "noisy oracle", "random walk", "stop at once")
"""Episode k acts by POLICIES[k % 4]: successes, detours, collisions and truncation, a failed STOP."""


# ------------------------------------------------------------------------------------------- episode order
def test_grouped_order_is_habitat_labs_episode_iterator():
    """Fed ddppo's epoch order (shuffle off), habitat-lab's EpisodeIterator with group_by_scene,
    max_scene_repeat_episodes and max_scene_repeat_steps (its randomisation off) gives ddppo's stream, episode for
    episode, under the same steps taken: forced scene switches included."""
    need_habitat_lab()
    from habitat.core.dataset import Episode as LabEpisode
    from habitat.core.dataset import EpisodeIterator

    sizes = [3, 7, 2, 5, 4, 1]
    scenes = np.repeat(np.arange(len(sizes)), sizes)
    by_scene = [np.flatnonzero(scenes == s) for s in range(len(sizes))]
    rng = np.random.default_rng(0)
    switched = 0
    for trial in range(100):
        max_steps, max_episodes = int(rng.integers(1, 30)), int(rng.choice([-1, 1, 2, 3]))
        ours = SceneGroupedIterator(by_scene, seed=trial, env_index=0, max_repeat_episodes=max_episodes,
                                    max_repeat_steps=max_steps, step_repetition_range=0.0)
        order = [int(by_scene[s][ours._scene_perm(s)[c]]) for s in ours.queue_scenes for c in range(sizes[s])]
        theirs = EpisodeIterator([LabEpisode(episode_id=str(k), scene_id=f"s{scenes[k]}", start_position=[0, 0, 0],
                                             start_rotation=[0, 0, 0, 1]) for k in order],
                                 cycle=True, shuffle=False, group_by_scene=True, max_scene_repeat_episodes=max_episodes,
                                 max_scene_repeat_steps=max_steps, step_repetition_range=0.0)
        for _ in range(len(scenes)):  # the first epoch (habitat-lab without shuffle repeats it; ddppo reshuffles)
            assert ours.next() == int(next(theirs).episode_id), trial
            for _ in range(int(rng.integers(0, 12))):
                ours.step_taken()
                theirs.step_taken()
        switched += ours.draws > 0
    assert switched > 50  # most trials forced scene switches


# ------------------------------------------------------------------------------------------- the same episodes
def _draw_episodes(hs, pathfinder, n: int, seed: int) -> list[Episode]:
    """Episodes on the navmesh: start and goal navigable, on one floor, geodesic distance in [1, 5] m."""
    pathfinder.seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        a, b = np.asarray(pathfinder.get_random_navigable_point()), np.asarray(pathfinder.get_random_navigable_point())
        path = hs.ShortestPath()
        path.requested_start, path.requested_end = a, b
        if pathfinder.find_path(path) and 1.0 <= path.geodesic_distance <= 5.0 and abs(a[1] - b[1]) < 0.1:
            out.append(Episode(str(len(out)), "simple_room.glb", tuple(map(float, a)),
                               tuple(heading_to_quaternion(rng.uniform(-math.pi, math.pi))), tuple(map(float, b)),
                               float(path.geodesic_distance)))
    return out


@dataclass
class ParityData:
    data_dir: Path
    """``{data_dir}/val/val.json.gz``: the episodes."""
    scenes_dir: Path
    episode_ids: list[int] | None = None
    """The episodes both environments run (default: all)."""


@pytest.fixture(scope="module", params=["simple_room", "exported"])
def dataset(request, tmp_path_factory) -> ParityData:
    """habitat-sim's simple_room.glb with the navmesh habitat-sim computes for our agent (radius 0.1, height 1.5)
    and episodes drawn on it; or the embedded val scenes exported for habitat-sim (tests/conftest.py), every third
    of their episodes (three scenes: each environment changes scene too)."""
    need_habitat_lab()
    import habitat_sim as hs

    if request.param == "exported":
        root = request.getfixturevalue("habitat_exported_dataset")
        return ParityData(root, root, list(range(0, len(load_episodes(episodes_path(root, "val"))), 3)))
    root = tmp_path_factory.mktemp("habitat_lab_parity")
    scene = habitat_test_scene("simple_room.glb", root / "scenes")
    pathfinder = navmesh_for(hs, scene, radius=0.1, save=True)
    save_episodes(_draw_episodes(hs, pathfinder, N_EPISODES, seed=0), episodes_path(root, "val"))
    return ParityData(root, root / "scenes")


def habitat_lab_env(data: ParityData):
    """habitat-lab's PointNav benchmark config on our dataset: depth only, software rendering, SoftSPL,
    collisions, GPS and compass added, our step limit."""
    import habitat
    from habitat.config import read_write

    sensors = "habitat.simulator.agents.main_agent.sim_sensors"
    config = habitat.get_config("benchmark/nav/pointnav/pointnav_habitat_test.yaml", overrides=[
        f"~{sensors}.rgb_sensor", f"{sensors}.depth_sensor.width={RESOLUTION}",
        f"{sensors}.depth_sensor.height={RESOLUTION}", "habitat.simulator.habitat_sim_v0.gpu_device_id=-1",
        "+habitat/task/measurements@habitat.task.measurements.soft_spl=soft_spl",
        "+habitat/task/measurements@habitat.task.measurements.collisions=collisions",
        "+habitat/task/lab_sensors@habitat.task.lab_sensors.gps_sensor=gps_sensor",
        "+habitat/task/lab_sensors@habitat.task.lab_sensors.compass_sensor=compass_sensor",
        f"habitat.environment.max_episode_steps={MAX_STEPS}"])
    with read_write(config):
        config.habitat.dataset.data_path = str(data.data_dir / "{split}" / "{split}.json.gz")
        config.habitat.dataset.split = "val"
        config.habitat.dataset.scenes_dir = str(data.scenes_dir)
    return habitat.Env(config=config)


def ddppo_env(data: ParityData):
    cfg = load_config(None, [f"task.data_dir={data.data_dir}", "task.split=val", "task.generate_if_missing=false",
                             "sim.backend=habitat", f"task.scenes_dir={data.scenes_dir}",
                             f"sim.resolution={RESOLUTION}", "sim.sensors=[depth]",
                             f"task.max_episode_steps={MAX_STEPS}"])
    return make_vector_env(cfg, "val", 1, order="partition", episode_ids=data.episode_ids)


@dataclass
class Frame:
    """One side's view of one moment of an episode (t = 0: its start)."""

    x: float
    z: float
    heading: float
    pointgoal: np.ndarray
    gps: np.ndarray
    compass: float
    distance: float
    collided: bool = False
    collisions: int = 0
    progress: float = 0.0
    """The reward's distance term: the decrease of the distance to the goal this step."""
    ended: bool = False
    end: dict = field(default_factory=dict)
    """success, spl, softspl at the episode's last step."""


def _theirs(env, obs, t: int) -> Frame:
    from habitat.utils.geometry_utils import quaternion_to_list

    from ddppo.sim.habitat_backend import yaw_of_quaternion

    state, m = env.sim.get_agent_state(), env.get_metrics()
    ended = env.episode_over
    return Frame(float(state.position[0]), float(state.position[2]),
                 yaw_of_quaternion(quaternion_to_list(state.rotation)), np.asarray(obs["pointgoal_with_gps_compass"]),
                 np.asarray(obs["gps"]), float(np.asarray(obs["compass"]).reshape(-1)[0]), float(m["distance_to_goal"]),
                 bool(m["collisions"]["is_collision"]), int(m["collisions"]["count"]),
                 float(m["distance_to_goal_reward"]) if t else 0.0, ended,
                 {"success": m["success"], "spl": m["spl"], "softspl": m["soft_spl"]} if ended else {})


def _ours(env, obs, info=None, reward=None, done=False) -> Frame:
    i = info or {"agent_x": env.x, "agent_z": env.z, "agent_theta": env.theta, "distance_to_goal": env.start_distance}
    frame = Frame(float(i["agent_x"][0]), float(i["agent_z"][0]), float(i["agent_theta"][0]),
                  obs["pointgoal_with_gps_compass"][0].numpy(), obs["gps"][0].numpy(), float(obs["compass"][0, 0]),
                  float(i["distance_to_goal"][0]))
    if info is not None:
        success = float(info["success"][0])
        frame.collided, frame.collisions, frame.ended = bool(info["collided"][0]), int(info["collisions"][0]), done
        # ddppo's reward is habitat-baselines' PointNav reward: slack + distance decrease + success bonus
        frame.progress = float(reward[0]) + 0.01 - 2.5 * success
        if done:
            frame.end = {"success": success, "spl": float(info["spl"][0]), "softspl": float(info["softspl"][0])}
    return frame


def _action(policy: str, oracle: int, t: int, rng) -> int:
    if policy == "stop at once":
        return STOP
    if policy == "random walk" or (policy == "noisy oracle" and rng.random() < 0.25):
        return int(rng.choice([MOVE_FORWARD, MOVE_FORWARD, TURN_LEFT, TURN_RIGHT]))
    return oracle


@pytest.fixture(scope="module")
def lockstep(dataset):
    """Every episode in both environments, the same action each step: a list per episode of (ours, theirs)."""
    lab, ours = habitat_lab_env(dataset), ddppo_env(dataset)
    rng = np.random.default_rng(1)
    episodes = []
    try:
        obs = ours.reset()
        by_id = {e.episode_id: e for e in lab.episodes}  # habitat-lab's iterator has shuffled its list
        assert {e.episode_id for e in ours.episodes} <= set(by_id)
        for k in range(len(ours.episodes)):
            lab.current_episode = by_id[ours.current_episodes()[0].episode_id]
            frames = [(_ours(ours, obs), _theirs(lab, lab.reset(), 0))]
            for t in range(1, MAX_STEPS + 1):
                action = _action(POLICIES[k % len(POLICIES)], int(ours.oracle_actions()[0]), t, rng)
                r = ours.step(torch.tensor([action]))
                frames.append((_ours(ours, r.final_obs, r.info, r.reward, bool(r.done[0])),
                               _theirs(lab, lab.step(ACTION_NAMES[action]), t)))
                if r.done[0] or lab.episode_over:
                    break
            episodes.append(frames)
            obs = r.obs
    finally:
        ours.close()
        lab.close()
    return episodes


def _worst(lockstep, quantity) -> float:
    return max(quantity(a, b) for frames in lockstep for a, b in frames)


def test_the_episodes_cover_what_the_measures_distinguish(lockstep):
    ends = [frames[-1] for frames in lockstep]
    assert len(lockstep) >= N_EPISODES and all(a.ended and b.ended for a, b in ends)
    assert {a.end["success"] for a, _ in ends} == {0.0, 1.0}
    assert any(a.collisions > 0 for a, _ in ends)
    assert any(len(frames) == MAX_STEPS + 1 for frames in lockstep)  # a step-limit end


def test_same_pose_after_every_step(lockstep):
    assert _worst(lockstep, lambda a, b: math.hypot(a.x - b.x, a.z - b.z)) < 1e-5
    assert _worst(lockstep, lambda a, b: abs(math.remainder(a.heading - b.heading, 2 * math.pi))) < 1e-5


def test_distance_to_goal_is_habitat_labs(lockstep):
    assert _worst(lockstep, lambda a, b: abs(a.distance - b.distance)) < 1e-5


def test_pointgoal_gps_and_compass_are_habitat_labs(lockstep):
    def polar(a, b):
        return max(abs(a.pointgoal[0] - b.pointgoal[0]), abs(math.remainder(a.pointgoal[1] - b.pointgoal[1],
                                                                            2 * math.pi)))

    assert _worst(lockstep, polar) < 1e-5
    assert _worst(lockstep, lambda a, b: float(np.abs(a.gps - b.gps).max())) < 1e-5
    assert _worst(lockstep, lambda a, b: abs(math.remainder(a.compass - b.compass, 2 * math.pi))) < 1e-5


def test_collisions_are_habitat_labs(lockstep):
    assert all(a.collided == b.collided and a.collisions == b.collisions for frames in lockstep for a, b in frames)


def test_the_rewards_distance_term_is_habitat_labs(lockstep):
    assert _worst(lockstep, lambda a, b: abs(a.progress - b.progress)) < 1e-5


def test_episodes_end_together_with_habitat_labs_success_spl_and_softspl(lockstep):
    for frames in lockstep:
        assert all(a.ended == b.ended for a, b in frames)
        ours, theirs = frames[-1][0].end, frames[-1][1].end
        assert ours["success"] == theirs["success"]
        assert ours["spl"] == pytest.approx(theirs["spl"], abs=1e-6)
        assert ours["softspl"] == pytest.approx(theirs["softspl"], abs=1e-6)
