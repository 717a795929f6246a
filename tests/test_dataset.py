"""PointNav episodes (habitat's PointNavDatasetV1 json.gz) and scene files: the generator's rules, round trips,
habitat's ``content/`` layout, errors that name the file and the field, and atomic dataset generation."""

from __future__ import annotations

import gzip
import json
import math
import shutil

import numpy as np
import pytest
from habitat_lab_support import need_habitat_lab

import ddppo.sim.dataset_dir as data_mod
from ddppo.config import DatasetConfig, load_config
from ddppo.sim.dataset import Episode, generate_episodes, load_episodes, save_episodes, scene_name
from ddppo.sim.dataset_dir import episodes_path, generate_dataset, load_split
from ddppo.sim.environments import make_vector_env
from ddppo.sim.floorplan import FloorPlanConfig, generate_floor_plan, scene_seed
from ddppo.sim.navmesh import GeodesicCache, NavGrid
from ddppo.sim.scene import load_scene, save_scene


@pytest.fixture(scope="module")
def splits(small_dataset):
    return {split: load_split(small_dataset, split) for split in ("train", "val")}


def euclid(ep: Episode) -> float:
    return math.hypot(ep.start_position[0] - ep.goal_position[0], ep.start_position[2] - ep.goal_position[2])


# ------------------------------------------------------------------------------------------------ generator
def test_layout_on_disk(small_dataset):
    assert sorted(p.name for p in (small_dataset / "scenes").iterdir()) == [
        f"{s}_{k:04d}.npz" for s in ("train", "val") for k in range(3)
    ]
    for split, n in (("train", 60), ("val", 30)):
        assert episodes_path(small_dataset, split) == small_dataset / split / f"{split}.json.gz"
        assert len(load_episodes(episodes_path(small_dataset, split))) == n
    assert not [p for p in small_dataset.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("split", ["train", "val"])
def test_generated_episodes_obey_the_rules(splits, split):
    episodes, navs = splits[split]
    assert len({e.episode_id for e in episodes}) == len(episodes)
    for ep in episodes:
        nav = navs[scene_name(ep.scene_id)]
        sx, sy, sz = ep.start_position
        gx, gy, gz = ep.goal_position
        assert sy == 0.0 and gy == 0.0
        assert nav.is_navigable(sx, sz) and nav.is_navigable(gx, gz)
        assert nav.island_of(sx, sz) == nav.island_of(gx, gz) >= 0
        assert ep.geodesic_distance >= 1.0 and ep.geodesic_distance <= 30.0
        # stored distance = the distance recomputed from the scene file as loaded from disk
        assert nav.geodesic_distance((sx, sz), (gx, gz)) == pytest.approx(ep.geodesic_distance, rel=1e-5)
        assert ep.geodesic_distance >= euclid(ep) * 0.99  # a path is never shorter than the straight line
        q = np.asarray(ep.start_rotation)
        assert q[0] == 0.0 and q[2] == 0.0 and np.linalg.norm(q) == pytest.approx(1.0, abs=1e-9)
        assert ep.goal_radius is None
    # random yaw: headings spread over the circle
    yaws = np.array([e.start_heading for e in episodes]) % (2 * math.pi)
    assert np.histogram(yaws, bins=4, range=(0, 2 * math.pi))[0].min() >= len(episodes) // 10


def test_generator_respects_configured_geodesic_range():
    nav = NavGrid(generate_floor_plan(scene_seed(3, "val", 1), "val_x", FloorPlanConfig(max_extent=8.0)))
    eps = generate_episodes(nav, 20, np.random.default_rng(0), scene_id="val_x", first_id=100, min_geodesic=2.0,
                            max_geodesic=4.0)
    assert len(eps) == 20 and [e.episode_id for e in eps] == [str(k) for k in range(100, 120)]
    assert all(2.0 <= e.geodesic_distance <= 4.0 for e in eps)
    assert max(e.geodesic_distance for e in eps) > 3.0  # not just the short end of the window


def naive_ratios(navs, n_per_scene, rng):
    """geodesic / Euclidean of pairs drawn without habitat's near-straight rejection (same islands, [1, 30] m)."""
    out = []
    cache = GeodesicCache()
    for nav in navs:
        big = int(np.argmax(nav.island_sizes))
        got = 0
        while got < n_per_scene:
            goal = nav.sample_navigable(rng, 1, island=big)[0]
            field = cache.get(nav, *goal)
            for start in nav.sample_navigable(rng, 4, island=big):
                geo = float(nav.sample(field, start[:1], start[1:])[0])
                if 1.0 <= geo <= 30.0:
                    out.append(geo / math.hypot(*(start - goal)))
                    got += 1
    return np.asarray(out)


def test_near_straight_episodes_are_rare(splits):
    """Habitat keeps an episode with geodesic/Euclidean < 1.1 only with probability 20 (ratio - 0.98)^2 <= 0.29."""
    episodes = splits["train"][0] + splits["val"][0]
    navs = list(splits["train"][1].values()) + list(splits["val"][1].values())
    gen = np.array([e.geodesic_distance / euclid(e) for e in episodes])
    naive = naive_ratios(navs, 15, np.random.default_rng(0))
    gen_frac, naive_frac = (gen < 1.1).mean(), (naive < 1.1).mean()
    assert naive_frac > 0.15, naive_frac  # the scenes do offer many straight pairs
    assert gen_frac < 0.4 * naive_frac, (gen_frac, naive_frac)
    # and near-straight episodes are not banned outright either: the kept ones are the least straight
    assert (gen >= 1.1).mean() > 0.5


# --------------------------------------------------------------------------------------------- json.gz I/O
def test_json_gz_round_trip_preserves_every_field(tmp_path, splits):
    episodes = list(splits["val"][0][:5])
    episodes.append(Episode("x-7", "data/scene_datasets/gibson/Adrian.glb", (1.5, 0.0, -2.25),
                            (0.0, 0.3826834323650898, 0.0, 0.9238795325112867), (-3.0, 0.0, 4.125), 7.5, 0.2))
    path = save_episodes(episodes, tmp_path / "val" / "val.json.gz")
    again = load_episodes(path)
    assert again == episodes
    for a, b in zip(again, episodes):
        assert a.to_json() == b.to_json()
    raw = json.loads(gzip.decompress(path.read_bytes()))
    ep = raw["episodes"][-1]
    assert ep == {
        "episode_id": "x-7",
        "scene_id": "data/scene_datasets/gibson/Adrian.glb",
        "start_position": [1.5, 0.0, -2.25],
        "start_rotation": [0.0, 0.3826834323650898, 0.0, 0.9238795325112867],
        "info": {"geodesic_distance": 7.5},
        "goals": [{"position": [-3.0, 0.0, 4.125], "radius": 0.2}],
    }
    assert scene_name(ep["scene_id"]) == "Adrian"


def write_json_gz(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(obj).encode()))
    return path


def test_habitat_content_layout_loads(tmp_path, small_dataset, splits):
    """Habitat's layout: episodes in val/val.json.gz and in one val/content/{scene}.json.gz per scene, read
    together (habitat-lab's PointNavDatasetV1), scene_id a path to a .glb whose stem names the scene; the embedded
    backend checks and runs them all."""
    episodes, _ = splits["val"]
    root = tmp_path / "habitat"
    shutil.copytree(small_dataset / "scenes", root / "scenes")
    shutil.copytree(small_dataset / "geodesic", root / "geodesic")
    by_scene: dict[str, list] = {}
    for ep in episodes:
        raw = ep.to_json()
        raw["scene_id"] = f"data/scene_datasets/embedded/{ep.scene_id}.glb"
        by_scene.setdefault(ep.scene_id, []).append(raw)
    names = sorted(by_scene)
    write_json_gz(root / "val" / "val.json.gz", {"episodes": by_scene[names[0]]})  # one scene in the main file
    for name in names[1:]:
        write_json_gz(root / "val" / "content" / f"{name}.json.gz", {"episodes": by_scene[name]})
    loaded, navs = load_split(root, "val")
    assert sorted(navs) == names
    assert [e.episode_id for e in loaded] == [raw["episode_id"] for name in names for raw in by_scene[name]]
    key = lambda e: (scene_name(e.scene_id), int(e.episode_id))  # noqa: E731
    for a, b in zip(sorted(loaded, key=key), sorted(episodes, key=key)):
        assert scene_name(a.scene_id) == b.scene_id
        assert (a.start_position, a.start_rotation, a.goal_position) == (
            b.start_position, b.start_rotation, b.goal_position)
        assert a.geodesic_distance == b.geodesic_distance
    cfg = load_config(None, [f"task.data_dir={root}", "task.split=val", "task.generate_if_missing=false",
                             "sim.resolution=16", "sim.sensors=[depth]"])
    env = make_vector_env(cfg, "val", 2, order="partition")
    env.reset()
    assert len(env.episodes) == len(episodes)


def _episode(episode_id: str, scene_id: str) -> dict:
    return {**GOOD, "episode_id": episode_id, "scene_id": scene_id}


def content_dataset(root, content_scenes_path=None):
    """A hand-built habitat dataset: two episodes in the main file, three in content/{a,b}.json.gz, two in
    per_scene/c.json.gz, and files that are not per-scene files in both folders."""
    main = {"episodes": [_episode("m0", "gibson/m.glb"), _episode("m1", "data/scene_datasets/gibson/m.glb")]}
    if content_scenes_path:
        main["content_scenes_path"] = content_scenes_path
    path = write_json_gz(root / "val" / "val.json.gz", main)
    write_json_gz(root / "val" / "content" / "b.json.gz", {"episodes": [_episode("b0", "gibson/b.glb")]})
    write_json_gz(root / "val" / "content" / "a.json.gz", {"episodes": [_episode(f"a{k}", "gibson/a.glb")
                                                                        for k in range(2)]})
    write_json_gz(root / "val" / "per_scene" / "c.json.gz", {"episodes": [_episode(f"c{k}", "c.glb")
                                                                          for k in range(2)]})
    for folder in ("content", "per_scene"):
        (root / "val" / folder / "README.txt").write_text("not episodes")
    return path


CONTENT_CASES = {"default": (None, ["m0", "m1", "a0", "a1", "b0"]),
                 "content_scenes_path": ("{data_path}/per_scene/{scene}.json.gz", ["m0", "m1", "c0", "c1"])}


@pytest.mark.parametrize("case", CONTENT_CASES)
def test_main_file_and_per_scene_files_load_together(tmp_path, case):
    template, expected = CONTENT_CASES[case]
    assert [e.episode_id for e in load_episodes(content_dataset(tmp_path, template))] == expected


@pytest.mark.parametrize("case", CONTENT_CASES)
def test_per_scene_files_load_as_habitat_labs_own_loader_does(tmp_path, case):
    """The oracle: habitat-lab's PointNavDatasetV1 (content_scenes ["*"]) on the same files reads the same
    episodes in the same order, and its scene paths are ours resolved against its scenes_dir."""
    need_habitat_lab()
    from habitat.datasets.pointnav.pointnav_dataset import PointNavDatasetV1
    from omegaconf import OmegaConf

    from ddppo.sim.habitat_backend import resolve_scene

    path = content_dataset(tmp_path, CONTENT_CASES[case][0])
    config = OmegaConf.create({"type": "PointNav-v1", "split": "val", "scenes_dir": "/scenes", "content_scenes": ["*"],
                               "data_path": str(tmp_path / "{split}" / "{split}.json.gz")})
    theirs = PointNavDatasetV1(config).episodes
    ours = load_episodes(path)
    assert [e.episode_id for e in ours] == [e.episode_id for e in theirs]
    assert [resolve_scene(e.scene_id, "/scenes") for e in ours] == [e.scene_id for e in theirs]
    assert all(list(a.start_position) == list(b.start_position) and list(a.goal_position) == b.goals[0].position
               for a, b in zip(ours, theirs))


@pytest.mark.parametrize("template", ["{data_path}/content/all.json.gz", "{data_path}/{split}/{scene}.json.gz", 7])
def test_a_bad_content_scenes_path_names_the_file_and_field(tmp_path, template):
    path = content_dataset(tmp_path, template)
    with pytest.raises(ValueError, match="content_scenes_path") as err:
        load_episodes(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_an_empty_dataset_is_refused(tmp_path):
    path = write_json_gz(tmp_path / "val" / "val.json.gz", {"episodes": []})
    (tmp_path / "val" / "content").mkdir()
    with pytest.raises(ValueError, match="holds no episode"):
        load_episodes(path)


GOOD = {
    "episode_id": "0",
    "scene_id": "val_0000",
    "start_position": [1.0, 0.0, 2.0],
    "start_rotation": [0.0, 0.0, 0.0, 1.0],
    "info": {"geodesic_distance": 3.0},
    "goals": [{"position": [2.0, 0.0, 4.0], "radius": None}],
}


def corrupt_episode(**change):
    ep = json.loads(json.dumps(GOOD))
    for k, v in change.items():
        if v is None:
            del ep[k]
        else:
            ep[k] = v
    return {"episodes": [GOOD, ep]}


@pytest.mark.parametrize(
    "content, field",
    [
        ({"not_episodes": []}, "episodes"),
        ({"episodes": {"0": GOOD}}, "episodes"),
        (corrupt_episode(start_position=None), "start_position"),
        (corrupt_episode(start_rotation=[0.3, 0.0, 0.0, 0.95]), "start_rotation"),  # about x
        (corrupt_episode(start_rotation=[0.0, 0.0, 0.0]), "start_rotation"),
        (corrupt_episode(start_position=[1.0, 0.0, float("nan")]), "start_position"),
        (corrupt_episode(start_position=[1.0, "a", 2.0]), "start_position"),
        (corrupt_episode(goals=[{"position": [float("inf"), 0.0, 1.0]}]), "goals[0].position"),
        (corrupt_episode(goals=[]), "goals"),
        (corrupt_episode(episode_id=None), "episode_id"),
    ],
)
def test_corrupt_episode_files_name_file_and_field(tmp_path, content, field):
    path = write_json_gz(tmp_path / "val" / "val.json.gz", content)
    with pytest.raises(ValueError) as err:
        load_episodes(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{field}'" in msg, msg


@pytest.mark.parametrize(
    "raw",
    [
        gzip.compress(json.dumps({"episodes": [GOOD] * 20}).encode())[:-30],  # truncated gzip
        gzip.compress(b"this is not json"),
        b"not even gzip",
        gzip.compress(b"\xff\xfe\x00 binary"),
    ],
    ids=["truncated", "not-json", "not-gzip", "not-utf8"],
)
def test_unreadable_episode_files_name_the_file(tmp_path, raw):
    path = tmp_path / "val.json.gz"
    path.write_bytes(raw)
    with pytest.raises(ValueError) as err:
        load_episodes(path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == raw


def test_missing_episode_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="val.json.gz"):
        load_episodes(tmp_path / "val.json.gz")


# ------------------------------------------------------------------------------------------------- scenes
@pytest.fixture(scope="module")
def scene():
    return generate_floor_plan(scene_seed(0, "val", 2), "val_0002")


def test_scene_round_trip(tmp_path, scene):
    path = save_scene(scene, tmp_path / "scenes" / "val_0002.npz")
    again = load_scene(path)
    assert again.name == scene.name and again.cell_size == scene.cell_size and again.origin == scene.origin
    assert again.ceiling_height == scene.ceiling_height
    for field in ("occupancy", "material", "room_colors", "object_colors"):
        a, b = getattr(again, field), getattr(scene, field)
        assert a.dtype == b.dtype and np.array_equal(a, b), field
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left behind


def rewrite_npz(src, dst, drop=(), meta_change=None, arrays=None):
    with np.load(src) as d:
        parts = {k: d[k] for k in d.files if k not in drop}
    if meta_change:
        meta = json.loads(parts["meta"].tobytes().decode())
        for k, v in meta_change.items():
            if v is None:
                del meta[k]
            else:
                meta[k] = v
        parts["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    parts.update(arrays or {})
    with open(dst, "wb") as f:
        np.savez(f, **parts)


@pytest.mark.parametrize(
    "how, field",
    [
        (dict(meta_change={"version": 2}), "version"),
        (dict(meta_change={"format": "something-else"}), "format"),
        (dict(meta_change={"cell_size": None}), "cell_size"),
        (dict(meta_change={"ceiling_height": 0.3}), "ceiling_height"),
        (dict(meta_change={"origin": [float("nan"), 0.0]}), "origin"),
        (dict(meta_change={"name": None}), "name"),
        (dict(drop=("material",)), "material"),
        (dict(drop=("meta",)), "meta"),
        ("bad_occupancy", "occupancy"),
        ("occupancy_dtype", "occupancy"),
        ("material_shape", "material"),
        ("room_out_of_range", "material"),
    ],
)
def test_corrupt_scene_files_name_file_and_field(tmp_path, scene, how, field):
    good = save_scene(scene, tmp_path / "good.npz")
    path = tmp_path / "bad.npz"
    if how == "bad_occupancy":
        occ = scene.occupancy.copy()
        occ[5, 5] = 3
        how = dict(arrays={"occupancy": occ})
    elif how == "occupancy_dtype":
        how = dict(arrays={"occupancy": scene.occupancy.astype(np.int64)})
    elif how == "material_shape":
        how = dict(arrays={"material": scene.material[:-1]})
    elif how == "room_out_of_range":
        how = dict(arrays={"material": np.full_like(scene.material, len(scene.room_colors))})
    rewrite_npz(good, path, **how)
    before = path.read_bytes()
    with pytest.raises(ValueError) as err:
        load_scene(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{field}'" in msg, msg
    assert path.read_bytes() == before


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_scene_file(tmp_path, scene, cut):
    path = save_scene(scene, tmp_path / "s.npz")
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * cut)])
    before = path.read_bytes()
    with pytest.raises(ValueError) as err:
        load_scene(path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before


def test_save_scene_refuses_an_invalid_scene_and_keeps_the_old_file(tmp_path, scene):
    path = save_scene(scene, tmp_path / "s.npz")
    before = path.read_bytes()
    bad = generate_floor_plan(scene_seed(0, "val", 2), "val_0002")
    bad.occupancy[3, 3] = 7
    with pytest.raises(ValueError, match="occupancy"):
        save_scene(bad, path)
    assert path.read_bytes() == before


# -------------------------------------------------------------------------------------- generate_dataset
TINY = DatasetConfig(scenes={"val": 3}, episodes_per_scene={"val": 3}, min_extent=5.0, max_extent=6.0)


def test_generate_dataset_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "ds"
    generate_dataset(out, TINY, log=lambda *_: None)
    first = load_episodes(episodes_path(out, "val"))
    (out / "marker").write_text("old")
    with pytest.raises(FileExistsError):
        generate_dataset(out, TINY, log=lambda *_: None)
    assert (out / "marker").read_text() == "old"
    generate_dataset(out, TINY, force=True, log=lambda *_: None)
    assert not (out / "marker").exists()
    assert load_episodes(episodes_path(out, "val")) == first  # deterministic in the seed


def test_parallel_generation_gives_the_same_dataset(tmp_path):
    """Scenes generated in worker processes: the same files and arrays, episode ids in scene order over the split."""
    cfg = DatasetConfig(scenes={"train": 3, "val": 2}, episodes_per_scene={"train": 4, "val": 3}, min_extent=5.0,
                        max_extent=6.0)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    generate_dataset(serial, cfg, log=lambda *_: None, workers=1)
    generate_dataset(parallel, cfg, log=lambda *_: None, workers=2)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    assert len([f for f in files if f.parts[0] == "scenes"]) == 5
    for f in files:  # gzip and zip (npz) headers hold time stamps: compare what the files hold
        if f.suffix == ".gz":
            assert load_episodes(serial / f) == load_episodes(parallel / f), f
        else:
            with np.load(serial / f) as a, np.load(parallel / f) as b:
                assert sorted(a.files) == sorted(b.files), f
                for key in a.files:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{f}: {key}")
    train = load_episodes(episodes_path(parallel, "train"))
    assert [e.episode_id for e in train] == [str(i) for i in range(12)]
    assert [e.scene_id for e in train] == [f"train_{k:04d}" for k in range(3) for _ in range(4)]


def test_failed_generation_worker_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    cfg = DatasetConfig(scenes={"val": 2}, episodes_per_scene={"val": 2}, min_extent=5.0, max_extent=6.0)
    monkeypatch.setattr(data_mod.sys, "executable", shutil.which("false"))  # a worker that dies at once
    with pytest.raises(RuntimeError, match=r"split val: worker exited with code 1"):
        generate_dataset(tmp_path / "ds", cfg, log=lambda *_: None, workers=2)
    assert list(tmp_path.iterdir()) == []


def test_generation_workers_follow_the_cores(monkeypatch):
    monkeypatch.setattr(data_mod.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    assert data_mod.generation_workers(10, 20) == 1  # small splits: no start-up cost
    assert data_mod.generation_workers(60, 100) == 4
    assert data_mod.generation_workers(2, 1000) == 2  # no more workers than scenes
    monkeypatch.setattr(data_mod.os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert data_mod.generation_workers(60, 100) == 1


def fail_on_second_scene(monkeypatch):
    real = data_mod.generate_episodes
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure on the 2nd scene")
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "generate_episodes", flaky)
    return calls


def test_generate_dataset_is_atomic(tmp_path, monkeypatch):
    calls = fail_on_second_scene(monkeypatch)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="2nd scene"):
        generate_dataset(out, TINY, log=lambda *_: None)
    assert len(calls) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left either


def test_failed_forced_regeneration_keeps_the_old_dataset(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    generate_dataset(out, TINY, log=lambda *_: None)
    snapshot = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fail_on_second_scene(monkeypatch)
    with pytest.raises(RuntimeError):
        generate_dataset(out, TINY, force=True, log=lambda *_: None)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_generate_dataset_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="holdout"):
        generate_dataset(tmp_path / "ds", DatasetConfig(scenes={"holdout": 1}), log=lambda *_: None)
    assert not (tmp_path / "ds").exists()


def test_generated_dataset_stores_geodesic_fields_that_match_fmm(small_dataset):
    import torch

    from ddppo.config import SimConfig, TaskConfig
    from ddppo.sim.vector_env import PointNavVectorEnv

    episodes, navs = load_split(small_dataset, "val")
    for ep in episodes[::7]:
        nav = navs[ep.scene_id]
        stored = nav.store.get(ep.goal_position[0], ep.goal_position[2])
        fresh = nav.geodesic_field(ep.goal_position[0], ep.goal_position[2])
        assert stored is not None and np.array_equal(np.isfinite(stored), np.isfinite(fresh))
        finite = np.isfinite(fresh)
        assert np.abs(stored[finite] - fresh[finite]).max() <= 0.0006  # millimetre storage
    env = PointNavVectorEnv(episodes, navs, 4, SimConfig(resolution=16), TaskConfig(max_episode_steps=5))
    env.reset()
    for _ in range(30):
        env.step(torch.ones(4, dtype=torch.long))
    assert env.cache.misses > 4 and env.cache.computed == 0  # every field came from the store


def test_damaged_geodesic_store_only_costs_speed(small_dataset, tmp_path):
    from ddppo.sim.dataset_dir import geodesic_store_path

    copy = tmp_path / "data"
    shutil.copytree(small_dataset, copy)
    episodes, navs = load_split(copy, "val")
    ep = episodes[0]
    geodesic_store_path(copy, "val", ep.scene_id).write_bytes(b"not a zip")
    episodes, navs = load_split(copy, "val")
    assert navs[ep.scene_id].store.get(ep.goal_position[0], ep.goal_position[2]) is None
    from ddppo.sim.navmesh import GeodesicCache

    cache = GeodesicCache()
    assert np.isfinite(cache.get(navs[ep.scene_id], ep.goal_position[0], ep.goal_position[2])).any()
    assert cache.computed == 1


def test_dataset_generate_command(tmp_path, capsys):
    from ddppo.launch.cli import main as cli_main

    out = tmp_path / "gen"
    args = ["dataset", "generate", "--out", str(out), "scenes={train: 1, val: 1}", "max_extent=6",
            "episodes_per_scene={train: 4, val: 2}"]
    assert cli_main(args) == 0
    assert len(load_split(out, "train")[0]) == 4 and len(load_split(out, "val")[0]) == 2
    assert cli_main(args) == 2 and "exists" in capsys.readouterr().err  # refuses to overwrite
    assert cli_main([*args, "--force"]) == 0
    assert cli_main(["dataset", "generate", "--out", str(tmp_path / "x"), "max_extent=1"]) == 2
    assert "max_extent" in capsys.readouterr().err
    assert cli_main(["dataset", "generate", "--out", str(tmp_path / "x"), "scenes={bogus: 1}"]) == 2


def test_geodesic_store_reads_members_in_place_and_falls_back_to_np_load(small_dataset, tmp_path):
    """Stored fields come from a memory map of the .npz (uncompressed members located once); whatever the map cannot
    place (here: a compressed copy of the same store) is read by np.load, with the same result."""
    from ddppo.sim.dataset_dir import geodesic_store_path
    from ddppo.sim.navmesh import GeodesicStore

    episodes, _ = load_split(small_dataset, "val")
    path = geodesic_store_path(small_dataset, "val", episodes[0].scene_id)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, **arrays)
    mapped, zipped = GeodesicStore(path), GeodesicStore(compressed)
    assert len(arrays["goals"]) >= 2
    for k, (x, z) in enumerate(arrays["goals"]):
        mm = arrays[f"g{k}"]
        expected = np.where(mm == GeodesicStore.UNREACHABLE, np.inf, mm / 1000.0).astype(np.float32)
        np.testing.assert_array_equal(mapped.get(x, z), expected)
        np.testing.assert_array_equal(zipped.get(x, z), expected)
    assert set(mapped._spans) == {f"g{k}" for k in range(len(arrays["goals"]))} | {"goals"}
    assert zipped._spans == {}
    assert mapped.get(1e6, 1e6) is None
