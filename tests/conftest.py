"""Shared fixtures of the simulator tests: hand-built scenes and one small generated dataset per session."""

from __future__ import annotations

import numpy as np
import pytest
from habitat_support import need_habitat

from ddppo.config import DatasetConfig
from ddppo.sim.dataset_dir import generate_dataset
from ddppo.sim.scene import WALL, Scene

SMALL_DATASET = DatasetConfig(scenes={"train": 3, "val": 3}, episodes_per_scene={"train": 20, "val": 10},
                              max_extent=12.0)


def _make_scene(occupancy, material=None, room_colors=None, object_colors=None, name="hand",
                ceiling_height=2.6, border=2) -> Scene:
    """A hand-built scene: 0.05 m cells, origin (0, 0), closed by a wall ``border`` cells thick."""
    occ = np.array(occupancy, dtype=np.uint8)
    if border:
        occ[:border] = occ[-border:] = WALL
        occ[:, :border] = occ[:, -border:] = WALL
    if material is None:
        material = np.zeros(occ.shape, np.int32)
    if room_colors is None:
        room_colors = np.array([[[120, 120, 120], [200, 60, 60]]], np.uint8)
    if object_colors is None:
        object_colors = np.zeros((0, 3), np.uint8)
    scene = Scene(name=name, cell_size=0.05, origin=(0.0, 0.0), occupancy=occ,
                  material=np.asarray(material, np.int32), room_colors=np.asarray(room_colors, np.uint8),
                  object_colors=np.asarray(object_colors, np.uint8), ceiling_height=ceiling_height)
    scene.validate(name)
    return scene


@pytest.fixture(scope="session")
def make_scene():
    """Factory: ``make_scene(occupancy, material=None, room_colors=None, object_colors=None, ...)``."""
    return _make_scene


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """3 train + 3 val generated scenes (<= 12 m), 20 / 10 episodes each; generated once per session."""
    out = tmp_path_factory.mktemp("pointnav") / "data"
    generate_dataset(out, SMALL_DATASET, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def habitat_exported_dataset(small_dataset, tmp_path_factory):
    """``small_dataset``'s val split exported for habitat-sim (``ddppo scene export``), once per session:
    ``{scene}.glb`` with the ``.navmesh`` habitat-sim computed for our agent, and the val episodes with scene_id
    ``{scene}.glb``. ``task.data_dir`` and ``task.scenes_dir`` are both this directory (the embedded backend reads
    the same episodes from it too). Skips, or fails under DDPPO_REQUIRE_SYSTEM, where habitat-sim does not import."""
    need_habitat()
    from ddppo.sim.scene_export import export_dataset

    out = tmp_path_factory.mktemp("habitat_export") / "data"
    export_dataset(small_dataset, out, ["val"], navmesh=True, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def two_scene_dataset(tmp_path_factory):
    """2 train + 1 val + 1 test small scenes (5-8 m), 20 / 5 / 5 episodes each: the distributed and multi-node runs'
    data, generated once per session."""
    from ddppo.config import load_config

    out = tmp_path_factory.mktemp("two_scene") / "data"
    cfg = load_config(None, ["dataset.scenes={train: 2, val: 1, test: 1}",
                             "dataset.episodes_per_scene={train: 20, val: 5, test: 5}",
                             "dataset.min_extent=5", "dataset.max_extent=8"]).dataset
    generate_dataset(out, cfg, log=lambda *_: None)
    return out
