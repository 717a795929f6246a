"""What of the habitat backend runs without habitat-sim: the translation from our config and conventions to
habitat's, the clear error where habitat-sim is missing, and the worker protocol its environments use (run here
with the embedded simulator in the workers, and checked step for step against the in-process embedded backend).
The behaviour habitat-sim itself must show is tests/test_backend_contract.py's."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from habitat_lab_support import habitat_test_scene, navmesh_for, need_habitat_lab
from habitat_support import need_habitat
from omegaconf import OmegaConf

from ddppo.config import TrainConfig
from ddppo.sim.dataset import Episode, save_episodes
from ddppo.sim.dataset_dir import episodes_path, load_split
from ddppo.sim.environments import make_vector_env
from ddppo.sim.geometry import heading_to_quaternion
from ddppo.sim.habitat_backend import (
    depth_observation,
    gpu_device_id,
    resolve_scene,
    rgb_observation,
    worker_settings,
    yaw_of_quaternion,
)
from ddppo.sim.vector_env import PointNavVectorEnv
from ddppo.sim.worker_env import EmbeddedWorkerSim, WorkerPool, WorkerVectorEnv

REPO = Path(__file__).resolve().parent.parent


def unchecked_config(*overrides: str):
    """A config as the loader builds it, without ``check`` (which needs habitat-sim for a habitat config)."""
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(list(overrides)))


# ------------------------------------------------------------------------------------------- translation
@pytest.mark.parametrize("theta", np.linspace(-math.pi + 1e-3, math.pi, 13))
def test_yaw_of_quaternion_inverts_our_heading(theta):
    assert yaw_of_quaternion(heading_to_quaternion(theta)) == pytest.approx(theta, abs=1e-9)


def test_yaw_of_quaternion_tolerates_a_tiny_tilt():
    x, y, z, w = 1e-4, math.sin(0.35), -1e-4, math.cos(0.35)
    assert yaw_of_quaternion([x, y, z, w]) == pytest.approx(0.7, abs=1e-3)


SCENE_IDS = ["gibson/Adrian.glb", "data/scene_datasets/gibson/Adrian.glb", "data/scene_datasets/mp3d/x/x.glb",
             "/abs/scene.glb", "Adrian.glb", "other/data/scene_datasets/y.glb"]
SCENES_DIRS = ["data/scene_datasets", "/mnt/scenes", "/mnt/scenes/", "relative/scenes", ""]


def test_scene_ids_resolve_as_habitat_lab_does():
    """habitat-lab's PointNavDatasetV1: a leading data/scene_datasets/ is stripped, the rest joined to scenes_dir."""
    for scenes_dir in ("data/scene_datasets", "/mnt/scenes"):
        for scene_id in ("gibson/Adrian.glb", "data/scene_datasets/gibson/Adrian.glb"):  # Gibson's two spellings
            assert resolve_scene(scene_id, scenes_dir) == f"{scenes_dir}/gibson/Adrian.glb"
    assert resolve_scene("data/scene_datasets/mp3d/x/x.glb", "/mnt/s") == "/mnt/s/mp3d/x/x.glb"
    assert resolve_scene("/abs/scene.glb", "data/scene_datasets") == "/abs/scene.glb"
    assert resolve_scene("other/data/scene_datasets/y.glb", "/s") == "/s/other/data/scene_datasets/y.glb"


def test_scene_ids_resolve_as_habitat_labs_own_dataset_loader():
    """The oracle: habitat-lab's PointNavDatasetV1.from_json on the same scene ids and scenes_dir."""
    import json

    need_habitat_lab()
    from habitat.datasets.pointnav.pointnav_dataset import PointNavDatasetV1

    raw = Episode("0", "", (0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), (1.0, 0.0, 0.0), 1.0).to_json()
    for scenes_dir in SCENES_DIRS:
        dataset = PointNavDatasetV1()
        dataset.from_json(json.dumps({"episodes": [{**raw, "scene_id": s} for s in SCENE_IDS]}), scenes_dir=scenes_dir)
        assert [resolve_scene(s, scenes_dir) for s in SCENE_IDS] == [e.scene_id for e in dataset.episodes], scenes_dir


def test_gpu_is_the_configured_one_else_the_trainers_else_the_local_rank():
    assert gpu_device_id(2, "cuda:0", 1) == 2
    assert gpu_device_id(-1, "cuda:1", 0) == 1
    assert gpu_device_id(-1, "cpu", 3, cuda_devices=4) == 3
    assert gpu_device_id(-1, "cpu", 5, cuda_devices=4) == 1
    assert gpu_device_id(-1, "cpu", 1, cuda_devices=0) == -1  # no GPU: habitat-sim's software EGL device
    assert gpu_device_id(-1, torch.device("cuda", 2), 0) == 2


def test_sensor_conversions():
    depth = np.array([[0.0, 5.0], [12.0, -1.0]], np.float32)
    out = depth_observation(depth, 10.0)
    assert out.shape == (2, 2, 1) and out.dtype == np.float32
    assert np.allclose(out[..., 0], [[0.0, 0.5], [1.0, 0.0]])
    rgba = np.arange(2 * 2 * 4, dtype=np.uint8).reshape(2, 2, 4)
    rgb = rgb_observation(rgba)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8 and np.array_equal(rgb, rgba[..., :3])


def test_worker_settings_carry_the_config():
    cfg = unchecked_config("sim.backend=habitat", "sim.resolution=128", "sim.sensors=[rgb,depth]",
                           "task.scene_dataset_config=hm3d.scene_dataset_config.json")
    s = worker_settings(cfg.sim, cfg.task, 3, seed=7, env_offset=6, device="cuda:1", local_rank=0)
    assert [x["seed"] for x in s] == [13, 14, 15] and {x["gpu_device_id"] for x in s} == {1}
    assert s[0]["resolution"] == 128 and s[0]["sensors"] == ["rgb", "depth"]
    assert (s[0]["forward_step"], s[0]["turn_angle"], s[0]["max_depth"]) == (0.25, 10.0, 10.0)
    assert s[0]["scene_dataset_config"] == "hm3d.scene_dataset_config.json"


# ------------------------------------------------------------------------------------------- errors
def _habitat_dataset(tmp_path: Path, scene_file: str) -> Path:
    data = tmp_path / "pointnav"
    ep = Episode("0", scene_file, (0.0, 0.0, 0.0), tuple(heading_to_quaternion(0.0)), (2.0, 0.0, 0.0), 2.0)
    save_episodes([ep], episodes_path(data, "val"))
    return data


@pytest.mark.parametrize("scene_id", ["gibson/Nowhere.glb", "data/scene_datasets/gibson/Nowhere.glb"])
def test_missing_scene_file_is_named_with_the_key_to_fix(tmp_path, scene_id):
    """A custom task.scenes_dir takes both Gibson spellings of a scene id to the same file."""
    data = _habitat_dataset(tmp_path, scene_id)
    cfg = unchecked_config("sim.backend=habitat", f"task.data_dir={data}", f"task.scenes_dir={tmp_path / 'scenes'}")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "scenes" / "gibson" / "Nowhere.glb"))) as e:
        make_vector_env(cfg, "val", 1)
    assert "task.scenes_dir" in str(e.value) and "\n" not in str(e.value)


BLOCK_HABITAT = 'import sys; sys.modules["habitat_sim"] = None\n'
"""What Python does for a module that is not installed: ``import habitat_sim`` raises ImportError."""


def run_without_habitat(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_HABITAT + code], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_without_habitat_sim_a_habitat_run_fails_first_with_the_install_command(tmp_path):
    """Where habitat-sim does not import (a fresh machine; here a child process in which its import fails as for a
    module that is not installed), a habitat config stops at start, in one line, with the install command; so does
    building a habitat env whose scene files exist."""
    config = REPO / "configs" / "pointnav" / "habitat_gibson_depth.yaml"
    done = run_without_habitat(
        f"from ddppo.launch.cli import main; sys.exit(main(['train', '--config', {str(config)!r}]))", tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "conda install habitat-sim withbullet headless -c conda-forge -c aihabitat" in err and "Docker" in err
    (tmp_path / "scenes" / "gibson").mkdir(parents=True)
    (tmp_path / "scenes" / "gibson" / "Here.glb").write_bytes(b"")
    data = _habitat_dataset(tmp_path, "gibson/Here.glb")
    overrides = ["sim.backend=habitat", f"task.data_dir={data}", f"task.scenes_dir={tmp_path / 'scenes'}"]
    done = run_without_habitat(
        "from omegaconf import OmegaConf\n"
        "from ddppo.config import TrainConfig\nfrom ddppo.sim.environments import make_vector_env\n"
        "from ddppo.sim.habitat_backend import HabitatUnavailable\n"
        f"cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist({overrides!r}))\n"
        "try:\n    make_vector_env(cfg, 'val', 1)\nexcept HabitatUnavailable as e:\n    print(e)\n    sys.exit(7)\n",
        tmp_path)
    assert done.returncode == 7, done.stderr[-2000:]
    assert "conda install habitat-sim" in done.stdout and len(done.stdout.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- navmesh
def test_a_navmesh_made_for_another_agent_is_rebuilt_for_ours(tmp_path):
    """habitat-lab's default_agent_navmesh on real habitat-sim: a scene shipped with a navmesh built for a 0.3 m
    agent is loaded with one rebuilt for ours (0.1 m, 1.5 m), the very mesh habitat-sim computes for those."""
    hs = need_habitat()
    from ddppo.sim.habitat_backend import HabitatSim

    scene = habitat_test_scene("simple_room.glb", tmp_path)
    shipped = navmesh_for(hs, scene, radius=0.3, save=True)
    ours = navmesh_for(hs, scene, radius=0.1)
    assert shipped.nav_mesh_settings.agent_radius == pytest.approx(0.3)
    assert shipped.navigable_area < ours.navigable_area  # a wider agent keeps further from the furniture
    start = [float(v) for v in shipped.get_random_navigable_point()]
    sim = HabitatSim(resolution=8, sensors=["depth"], forward_step=0.25, turn_angle=10.0, max_depth=10.0,
                     gpu_device_id=-1, seed=0)
    try:
        sim.place(str(scene), start, [0.0, 0.0, 0.0, 1.0], start)
        loaded = sim.sim.pathfinder
        assert loaded.nav_mesh_settings.agent_radius == pytest.approx(0.1)
        assert loaded.nav_mesh_settings.agent_height == pytest.approx(1.5)
        assert loaded.navigable_area == pytest.approx(ours.navigable_area, rel=1e-6)
        assert np.array_equal(np.asarray(loaded.build_navmesh_vertices()), np.asarray(ours.build_navmesh_vertices()))
    finally:
        sim.close()


# ------------------------------------------------------------------------------------------- worker protocol
def test_worker_backend_matches_the_embedded_backend_step_for_step(small_dataset):
    """The same episodes and actions through WorkerVectorEnv (worker processes, pipes, main-process task code)
    and PointNavVectorEnv give the same observations, rewards, episode ends and metrics (both in habitat-lab's
    scene-grouped order, the worker backend's default)."""
    cfg = unchecked_config(f"task.data_dir={small_dataset}", "sim.resolution=12", "sim.sensors=[rgb,depth]",
                           "sim.kernels=torch", "task.max_episode_steps=25")
    episodes, navs = load_split(small_dataset, "val")
    ours = PointNavVectorEnv(episodes, navs, 3, cfg.sim, cfg.task, seed=5, group_by_scene=True)
    settings = dict(scenes_dir=str(small_dataset / "scenes"), store_dir=str(small_dataset / "geodesic" / "val"),
                    resolution=12, sensors=["rgb", "depth"], kernels="torch")
    with WorkerVectorEnv(episodes, 3, cfg.sim, cfg.task, EmbeddedWorkerSim, [settings] * 3, seed=5) as theirs:
        a, b = ours.reset(), theirs.reset()
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)  # headings wrap apart
        rng = np.random.default_rng(0)
        ended = 0
        for _ in range(40):
            act = torch.from_numpy(rng.choice(4, size=3, p=[0.05, 0.65, 0.15, 0.15]))
            ra, rb = ours.step(act), theirs.step(act)
            assert torch.allclose(ra.reward, rb.reward, atol=1e-5)
            assert torch.equal(ra.terminated, rb.terminated) and torch.equal(ra.truncated, rb.truncated)
            for k in ("success", "spl", "softspl", "distance_to_goal", "collisions", "steps", "path_length",
                      "episode_index", "collided", "active"):
                assert torch.allclose(ra.info[k].float(), rb.info[k].float(), atol=1e-4), k
            for k in ra.obs:
                assert torch.allclose(ra.obs[k].float(), rb.obs[k].float(), atol=1e-4), k
                assert torch.allclose(ra.final_obs[k].float(), rb.final_obs[k].float(), atol=1e-4), k
            ended += int(ra.done.sum())
        assert ended >= 3


def test_a_failing_worker_is_a_one_line_error_naming_it(small_dataset):
    ep = load_split(small_dataset, "val")[0][0]
    good = (ep.scene_id, list(ep.start_position), list(ep.start_rotation), list(ep.goal_position))
    pool = WorkerPool(EmbeddedWorkerSim, [dict(scenes_dir=str(small_dataset / "scenes"), kernels="torch")] * 2)
    try:
        with pytest.raises(RuntimeError, match=r"simulator worker 1: FileNotFoundError: .*nowhere") as e:
            pool.call([0, 1], "place", [good, ("nowhere", *good[1:])])
        assert "\n" not in str(e.value)
    finally:
        pool.close()


def test_a_dead_worker_is_reported_not_waited_for(small_dataset):
    pool = WorkerPool(EmbeddedWorkerSim, [dict(scenes_dir=str(small_dataset / "scenes"), kernels="torch")])
    try:
        pool.procs[0].kill()
        with pytest.raises(RuntimeError, match=r"simulator worker 0 \(pid \d+\) died"):
            pool.call([0], "step", [(1,)])
    finally:
        pool.close()


# ------------------------------------------------------------------------------------------- docs
def test_readme_and_image_document_one_habitat_run():
    readme = (REPO / "README.md").read_text()
    assert "## Habitat backend / cloud GPUs" in readme and "docker build -t ddppo ." in readme
    assert re.search(r"docker run --gpus all [^\n]*\\\n\s*train --config configs/pointnav/habitat_gibson_depth\.yaml",
                     readme)
    assert (REPO / "configs" / "pointnav" / "habitat_gibson_depth.yaml").is_file()
    docker = (REPO / "Dockerfile").read_text()
    assert "ARG HABITAT_SIM=source" in docker and "WORKDIR /opt/ddppo" in docker  # habitat-sim built, no conda
    # the configs' relative data/ and runs/ paths reach the two volumes
    assert "ln -s /data /opt/ddppo/data" in docker and "ln -s /runs /opt/ddppo/runs" in docker
