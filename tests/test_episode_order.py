"""Episode streams (ddppo.sim.episode_order): habitat-lab's scene-grouped order and its scene split across
environments, exact resume of every stream, and how many scene loads each order costs a worker-process backend.
habitat-lab's own EpisodeIterator checks the grouped order in tests/test_habitat_lab_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddppo.config import SimConfig, TaskConfig
from ddppo.sim.dataset_dir import load_split
from ddppo.sim.episode_order import EpisodeIterator, SceneGroupedIterator, load_iterators, make_iterators, split_scenes
from ddppo.sim.geometry import STOP
from ddppo.sim.vector_env import PointNavVectorEnv
from ddppo.sim.worker_env import EmbeddedWorkerSim, WorkerVectorEnv

SIZES = [3, 7, 2, 5, 4, 1]
SCENES = np.repeat(np.arange(len(SIZES)), SIZES)


def by_scene(scenes=SCENES):
    return [np.flatnonzero(scenes == s) for s in range(int(scenes.max()) + 1)]


def runs(scene_sequence) -> list[int]:
    """The scenes of the sequence's runs (consecutive equal scenes count once)."""
    return [s for k, s in enumerate(scene_sequence) if k == 0 or s != scene_sequence[k - 1]]


def draw(it, n, steps_per_episode=0):
    out = []
    for _ in range(n):
        out.append(it.next())
        for _ in range(steps_per_episode):
            it.step_taken()
    return out


def test_grouped_epochs_cover_every_episode_once_one_run_per_scene():
    it = SceneGroupedIterator(by_scene(), seed=3, env_index=1, max_repeat_steps=-1)
    epochs = [draw(it, len(SCENES)) for _ in range(4)]
    for ks in epochs:
        assert sorted(ks) == list(range(len(SCENES)))
        assert sorted(runs(SCENES[ks].tolist())) == list(range(len(SIZES)))  # each scene's episodes in a row
    assert len({tuple(ks) for ks in epochs}) == 4  # every epoch is a fresh shuffle
    assert len({tuple(runs(SCENES[ks].tolist())) for ks in epochs}) > 1  # of the scene order too


def test_grouped_order_leaves_a_scene_after_its_step_limit():
    """habitat-lab's max_scene_repeat_steps: with a limit of 4 steps (exactly: no randomisation) and 2 steps per
    episode, a scene serves 2 episodes in a row, then its remaining episodes wait at the end of the epoch."""
    it = SceneGroupedIterator(by_scene(), seed=0, env_index=0, max_repeat_steps=4, step_repetition_range=0.0)
    ks = draw(it, len(SCENES), steps_per_episode=2)
    assert sorted(ks) == list(range(len(SCENES)))
    lengths = np.diff(np.flatnonzero(np.diff(np.r_[-1, SCENES[ks], -1]) != 0))
    assert lengths.max() == 2 and len(lengths) > len(SIZES)


def test_scene_order_is_that_of_first_appearance_in_a_uniform_shuffle():
    """Shuffling 11 episodes, 10 of scene 1 and 1 of scene 0, puts scene 1's group first with probability 10/11:
    the grouped order draws the same distribution (3,000 epochs: standard error 0.005)."""
    scenes = np.array([0] + [1] * 10)
    it = SceneGroupedIterator(by_scene(scenes), seed=0, env_index=0, max_repeat_steps=-1)
    first = [scenes[draw(it, 11)[0]] for _ in range(3000)]
    assert np.mean(first) == pytest.approx(10 / 11, abs=0.02)


def test_scenes_split_across_environments_as_habitat_baselines_does():
    shares = split_scenes(7, 3, seed=1, env_offset=0)
    assert sorted(s for share in shares for s in share) == list(range(7))
    assert sorted(len(share) for share in shares) == [2, 2, 3]
    assert split_scenes(2, 3, seed=1, env_offset=0) == [[0, 1]] * 3  # fewer scenes than envs: each gets all
    assert shares != split_scenes(7, 3, seed=1, env_offset=3)  # another worker (rank) deals another split
    its = make_iterators(SCENES, 3, seed=1, env_offset=0, order="shuffle", num_shares=None, group_by_scene=True)
    seen = [set(SCENES[draw(it, 40)].tolist()) for it in its]
    assert set().union(*seen) == set(range(len(SIZES))) and sum(map(len, seen)) == len(SIZES)


def test_every_stream_resumes_exactly_from_its_state():
    def fresh():
        return make_iterators(SCENES, 2, 5, 2, "shuffle", None, group_by_scene=True, max_scene_repeat_steps=6) + [
            EpisodeIterator(len(SCENES), 5, 4), EpisodeIterator(len(SCENES), 5, 0, "partition", 3)]

    its = fresh()
    for it in its:
        draw(it, 17, steps_per_episode=3)
    states = [it.state_dict() for it in its]
    expected = [draw(it, 30, steps_per_episode=3) for it in its]
    resumed = fresh()
    load_iterators(resumed, states)
    assert [draw(it, 30, steps_per_episode=3) for it in resumed] == expected


def test_a_resume_state_of_another_order_or_another_dataset_is_refused():
    grouped = SceneGroupedIterator(by_scene(), seed=0, env_index=0)
    with pytest.raises(ValueError, match="SceneGroupedIterator"):
        load_iterators([grouped], [EpisodeIterator(10, 0, 0).state_dict()])
    state = grouped.state_dict()
    state["queue_cursors"][0] = 99
    with pytest.raises(ValueError, match="scene queue does not fit"):
        load_iterators([SceneGroupedIterator(by_scene(), seed=0, env_index=0)], [state])


# ------------------------------------------------------------------------------------------- environments
def _stop_everywhere(env, steps):
    env.reset()
    seen = [env.episode_index.clone()]
    for _ in range(steps):
        env.step(torch.full((env.num_envs,), STOP))
        seen.append(env.episode_index.clone())
    return torch.stack(seen, 1)  # [env, episode]


def test_embedded_default_mixes_scenes_and_grouping_is_an_option(small_dataset):
    episodes, navs = load_split(small_dataset, "train")
    scene_of = np.array([ep.scene_id for ep in episodes])
    cfg = (SimConfig(resolution=4, sensors=["depth"]), TaskConfig())
    mixed = scene_of[_stop_everywhere(PointNavVectorEnv(episodes, navs, 2, *cfg, seed=1), 30).numpy()]
    grouped = scene_of[_stop_everywhere(PointNavVectorEnv(episodes, navs, 2, *cfg, seed=1, group_by_scene=True),
                                        30).numpy()]
    assert min(len(runs(list(row))) for row in mixed) > 10
    assert max(len(runs(list(row))) for row in grouped) <= 3  # 3 scenes of 20 episodes, 31 episodes per env


def test_worker_envs_load_a_scene_per_scene_run_not_per_episode(small_dataset):
    """The habitat backend's code path (worker processes) counts its scene loads: grouped by scene, one per scene
    run; shuffled over the whole split, nearly one per episode."""
    episodes, _ = load_split(small_dataset, "train")
    settings = dict(scenes_dir=str(small_dataset / "scenes"), store_dir=str(small_dataset / "geodesic" / "train"),
                    resolution=4, sensors=["depth"], kernels="torch")
    loads = {}
    for grouped in (True, False):
        with WorkerVectorEnv(episodes, 2, SimConfig(resolution=4, sensors=["depth"]), TaskConfig(), EmbeddedWorkerSim,
                             [settings] * 2, seed=1, group_by_scene=grouped) as env:
            _stop_everywhere(env, 30)
            loads[grouped] = env.scene_loads
    assert loads[True] <= 2 * 3 and loads[False] >= 30  # 2 envs x 31 episodes
