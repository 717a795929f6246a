"""Evaluation: exact episode partitioning (also across torchrun ranks), metrics recomputed independently from the
logged paths, reference agents, videos, plots, and refusing checkpoints that do not fit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from habitat_support import need_habitat

from ddppo.analysis.plot import drawn_values
from ddppo.config import load_config
from ddppo.evaluation.evaluate import Protocol, evaluation_protocol
from ddppo.launch.cli import main as cli_main
from ddppo.sim.dataset_dir import generate_dataset, load_split
from ddppo.sim.geometry import MOVE_FORWARD, STOP
from ddppo.trainer.loop import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["sim.resolution=16", "policy.encoder=simple_cnn", "policy.hidden_size=16", "policy.base_planes=4",
        "policy.rnn_type=gru", "policy.num_recurrent_layers=1", "ppo.num_envs=2", "ppo.num_steps=8",
        "ppo.num_mini_batch=1", "ppo.ppo_epoch=1", "eval_episodes=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a tiny run (2 updates) and its dataset."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    cfg = load_config(None, ["dataset.scenes={train: 2, val: 2, test: 1}", "dataset.max_extent=8",
                             "dataset.episodes_per_scene={train: 10, val: 6, test: 4}"]).dataset
    generate_dataset(data, cfg, log=lambda *_: None)
    ov = [*TINY, f"task.data_dir={data}", f"run_dir={root / 'runs'}", "name=tiny", "total_steps=32",
          "log_interval=1"]
    train(load_config(None, ov), log=lambda *_: None)
    ckpt = sorted((root / "runs" / "tiny" / "checkpoints").glob("ckpt_*.pt"))[-1]
    return {"root": root, "data": data, "ckpt": ckpt, "overrides": ov}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_cli(trained, out: Path, *extra: str) -> int:
    # 150 steps: enough for the oracle in these small scenes, and agents that never stop end sooner
    return cli_main(["eval", str(trained["ckpt"]), "--episodes", "0", "--num-envs", "3", "--out", str(out),
                     *extra, "task.max_episode_steps=150"])


def test_single_process_eval_writes_records_and_table(trained, tmp_path, capsys):
    assert eval_cli(trained, tmp_path / "ev") == 0
    table = capsys.readouterr().out
    assert "oracle: ddppo's ShortestPathFollower" in table  # which program the oracle row is
    for agent in ("checkpoint", "oracle", "random", "forward", "untrained"):
        assert agent in table
        records = read_jsonl(tmp_path / "ev" / f"{agent}.jsonl")
        assert [r["episode_id"] for r in records] == [str(k) for k in range(12)]  # every val episode, once
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["oracle"]["spl"] >= 0.9 and summary["oracle"]["success"] >= 0.99
    assert summary["random"]["spl"] <= 0.05 and summary["forward"]["success"] == 0.0
    assert summary["oracle"]["spl_ci95"] >= 0.0


def test_protocols_are_named_in_the_summary_and_the_table(trained, tmp_path, capsys):
    """Default: the ddppo protocol (most likely action, first 100 episodes: all 12 here). --protocol habitat:
    actions sampled (the untrained reference's too) on every episode, the same draws on a rerun."""
    base = ["eval", str(trained["ckpt"]), "--num-envs", "3", "--agents", "untrained", "task.max_episode_steps=150"]
    runs = {"ddppo": [], "habitat": ["--protocol", "habitat"], "again": ["--protocol", "habitat"]}
    for name, extra in runs.items():
        capsys.readouterr()
        assert cli_main([*base, *extra, "--out", str(tmp_path / name)]) == 0
        first_line = capsys.readouterr().out.splitlines()[0]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        if name == "ddppo":
            assert first_line == "protocol ddppo: the policy's most likely action, the first 100 episodes of val"
            assert summary["protocol"] == {"name": "ddppo", "actions": "most likely", "episodes": 100, "split": "val"}
        else:
            assert first_line == "protocol habitat: actions sampled from the policy, every episode of val"
            assert summary["protocol"] == {"name": "habitat", "actions": "sampled", "episodes": "all", "split": "val"}
        assert summary["checkpoint"]["episodes"] == summary["untrained"]["episodes"] == 12
    actions = {name: [r["actions"] for r in read_jsonl(tmp_path / name / "checkpoint.jsonl")] for name in runs}
    assert actions["habitat"] == actions["again"] and actions["habitat"] != actions["ddppo"]
    untrained = {name: [r["actions"] for r in read_jsonl(tmp_path / name / "untrained.jsonl")] for name in runs}
    assert untrained["habitat"] != untrained["ddppo"]


@pytest.mark.parametrize("extra,named", [(["--protocol", "habitat", "--episodes", "5"], "--episodes 5"),
                                         (["--protocol", "habitat", "--deterministic"], "--deterministic"),
                                         (["--protocol", "ddppo", "--sample"], "--sample")])
def test_flags_contradicting_the_protocol_are_one_line_errors(trained, tmp_path, capsys, extra, named):
    capsys.readouterr()
    assert cli_main(["eval", str(trained["ckpt"]), "--agents", "", "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and named in err and "--protocol" in err, err
    assert not (tmp_path / "x").exists()


def test_protocol_names_without_the_flag():
    assert evaluation_protocol(None) == Protocol("ddppo", False, 100)
    assert evaluation_protocol(None, True, 0) == Protocol("habitat", True, 0)
    assert evaluation_protocol(None, True, 10).name == "custom"
    assert evaluation_protocol("ddppo", None, 0) == Protocol("ddppo", False, 0)


def test_distributed_eval_equals_single_process(trained, tmp_path):
    assert eval_cli(trained, tmp_path / "single", "--agents", "oracle") == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29655", "-m",
           "ddppo.launch.cli", "eval", str(trained["ckpt"]), "--episodes", "0", "--num-envs", "3", "--agents", "oracle",
           "--out", str(tmp_path / "dist"), "task.max_episode_steps=150"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    for agent in ("checkpoint", "oracle"):
        single = read_jsonl(tmp_path / "single" / f"{agent}.jsonl")
        both = read_jsonl(tmp_path / "dist" / f"{agent}.jsonl")
        assert [r["episode_id"] for r in both] == [r["episode_id"] for r in single]
        for a, b in zip(single, both):
            assert a["actions"] == b["actions"], a["episode_id"]
            for k in ("success", "spl", "softspl", "distance_to_goal", "path_length", "collisions"):
                assert a[k] == pytest.approx(b[k], abs=1e-5), (a["episode_id"], k)


def test_summary_equals_recomputation_from_logged_paths(trained, tmp_path):
    """Success, SPL and path length recomputed from the records' paths with the navmesh alone; how episodes moved
    (any collision, the still forward steps they ended in, stuck) from the paths and actions."""
    assert eval_cli(trained, tmp_path / "ev", "--agents", "oracle,random,forward") == 0
    _, navs = load_split(trained["data"], "val")
    stuck = {}
    for agent in ("checkpoint", "oracle", "random", "forward"):
        records = read_jsonl(tmp_path / "ev" / f"{agent}.jsonl")
        summary = json.loads((tmp_path / "ev" / "summary.json").read_text())[agent]
        spls, successes = [], []
        for r in records:
            nav = navs[r["scene_id"]]
            path = np.array(r["path"])
            walked = float(np.linalg.norm(np.diff(path, axis=0), axis=1).sum())
            start_geo = nav.geodesic_distance(path[0], r["goal"])
            end_geo = nav.geodesic_distance(path[-1], r["goal"])
            success = float(r["actions"][-1] == STOP and end_geo < 0.2)
            assert walked == pytest.approx(r["path_length"], abs=1e-3)
            assert start_geo == pytest.approx(r["geodesic_distance"], rel=1e-3)
            assert len(r["actions"]) == r["steps"] == len(path) - 1
            successes.append(success)
            spls.append(success * start_geo / max(walked, start_geo))
            run = 0
            for action, step in zip(r["actions"], np.linalg.norm(np.diff(path, axis=0), axis=1)):
                run = run + 1 if action == MOVE_FORWARD and step < 0.01 else 0
            assert r["still_run_at_end"] == run
            assert r["ended_stuck"] == float(run >= 20) and r["any_collision"] == float(r["collisions"] > 0)
        stuck[agent] = summary["ended_stuck"]
        assert summary["ended_stuck"] == pytest.approx(np.mean([r["ended_stuck"] for r in records]))
        assert summary["any_collision"] == pytest.approx(np.mean([r["collisions"] > 0 for r in records]))
        assert summary["collisions_median"] == pytest.approx(np.median([r["collisions"] for r in records]))
        assert np.mean(successes) == pytest.approx(summary["success"], abs=1e-6)
        assert np.mean(spls) == pytest.approx(summary["spl"], abs=1e-3)
        half = 1.96 * np.std(spls, ddof=1) / math.sqrt(len(spls))
        assert summary["spl_ci95"] == pytest.approx(half, abs=1e-3)
    # pressing forward, an agent ends in a corner of the room (not the oracle, which never presses into geometry)
    assert stuck["forward"] > 0 and stuck["oracle"] == 0, stuck


def test_video_decodes_to_one_frame_per_step_and_tensorboard_has_it(trained, tmp_path):
    assert eval_cli(trained, tmp_path / "ev", "--agents", "", "--video", "1") == 0
    frames = iio.imread(tmp_path / "ev" / "videos" / "episode_0.mp4")
    steps = read_jsonl(tmp_path / "ev" / "checkpoint.jsonl")[0]["steps"]
    assert frames.shape[0] == steps + 1 and frames.shape[-1] == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "ev" / "tb"))
    acc.Reload()
    assert "video/episode_0" in acc.Tags()["images"]


def test_video_of_a_flee_or_exploration_run_shows_that_task(trained, tmp_path):
    """Videos run the checkpoint's own task: a PointNav episode shows its goal, the same episode as Flee or
    Exploration does not (their agents ignore the goal), and `ddppo eval --video` records the task's episodes."""
    from ddppo.evaluation.video import record_episodes
    from ddppo.sim.tasks import ExplorationVectorEnv, FleeVectorEnv
    from ddppo.sim.topdown import GOAL

    cfg = load_config(None, [*trained["overrides"], "task.max_episode_steps=6"])
    episodes, navs = load_split(trained["data"], "val")

    class Forward:
        def act(self, obs, prev, masks):
            return torch.ones(1, dtype=torch.long)

    seen = []

    def make_agent(envs):
        seen.append(type(envs))
        return Forward()

    def goal_pixels(frames):
        return sum(int(np.all(f == np.array(GOAL, np.uint8), axis=-1).sum()) for f in frames)

    for env_class, shows_goal in ((None, True), (FleeVectorEnv, False), (ExplorationVectorEnv, False)):
        kw = {"env_class": env_class} if env_class else {}
        (frames,) = record_episodes(episodes[:1], navs, cfg.sim, cfg.task, make_agent, **kw)
        assert len(frames) == 7  # the first observation and 6 steps to the step limit
        assert (goal_pixels(frames) > 0) == shows_goal, env_class
    assert [c.__name__ for c in seen] == ["PointNavVectorEnv", "FleeVectorEnv", "ExplorationVectorEnv"]

    assert eval_cli(trained, tmp_path / "ev", "--agents", "", "--video", "1", "task.type=flee") == 0
    record = read_jsonl(tmp_path / "ev" / "checkpoint.jsonl")[0]
    assert "distance_from_start" in record and "spl" not in record
    assert iio.imread(tmp_path / "ev" / "videos" / "episode_0.mp4").shape[0] == record["steps"] + 1


def test_video_is_refused_for_the_habitat_backend(trained, tmp_path, capsys):
    """Videos draw the embedded simulator's top-down map: with sim.backend=habitat, `ddppo eval --video` stops with
    one line before evaluating anything."""
    need_habitat()  # the habitat backend cannot be configured without it
    capsys.readouterr()
    habitat = ("sim.backend=habitat", "task.generate_if_missing=false", f"task.scenes_dir={tmp_path}")
    assert eval_cli(trained, tmp_path / "hab", "--video", "1", *habitat) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--video" in err and "sim.backend=embedded" in err, err
    assert not (tmp_path / "hab").exists()


def test_plot_writes_a_png(trained, tmp_path):
    out = tmp_path / "curves.png"
    run = trained["root"] / "runs" / "tiny"
    assert cli_main(["plot", str(run), str(run), "--out", str(out)]) == 0
    img = iio.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img.shape[0] > 100
    assert cli_main(["plot", str(run), "--out", str(out), "--metrics", "episode/nothing"]) == 2


def test_plot_smooths_training_windows_but_not_evaluations():
    values = [0.0, 0.3, 0.6, 0.3]
    assert drawn_values("episode/spl", values, 2) == pytest.approx([0.0, 0.15, 0.45, 0.45])
    assert drawn_values("episode/spl", values, 1) == values
    assert drawn_values("eval/spl", values, 2) == values


def test_checkpoint_of_another_architecture_or_damaged_is_a_one_line_error(trained, tmp_path, capsys):
    assert eval_cli(trained, tmp_path / "a", "policy.hidden_size=32") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "do not fit the configured policy" in err and str(trained["ckpt"]) in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(trained["ckpt"].read_bytes()[:500])
    assert cli_main(["eval", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err


class SystemCall:
    """Unpickling calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_habitat_baselines_shaped_checkpoints_never_run_code(tmp_path, capsys):
    """habitat-baselines' layout ({state_dict, config: an OmegaConf DictConfig, extra_state}): its config reads as
    plain data; the same file with an object whose unpickling calls os.system is refused in one line naming it, by
    checkpoint.load, `ddppo eval` and transfer.checkpoint, and nothing runs. So is a config holding a type outside
    the allow-list (here pathlib's), named."""
    from omegaconf import OmegaConf

    from ddppo.io import checkpoint
    from ddppo.trainer.transfer import apply_transfer

    marker = tmp_path / "PWNED"
    config = OmegaConf.create({"habitat_baselines": {"rl": {"ddppo": {"backbone": "resnet50"}}}, "steps": [1, 2.5]})
    shaped = {"state_dict": {"critic.fc.bias": torch.zeros(1)}, "config": config, "extra_state": {"step": 3}}
    files = {"benign": shaped, "system": {**shaped, "extra_state": SystemCall(f"touch {marker}")},
             "path": {**shaped, "config": OmegaConf.create({"data": Path("/tmp")})}}
    for name, content in files.items():
        torch.save(content, tmp_path / f"{name}.pth")
    loaded = checkpoint.load(tmp_path / "benign.pth")
    assert loaded["config"] == {"habitat_baselines": {"rl": {"ddppo": {"backbone": "resnet50"}}}, "steps": [1, 2.5]}
    for name, named in (("system", "GLOBAL posix.system"), ("path", "pathlib.")):
        bad = tmp_path / f"{name}.pth"
        with pytest.raises(ValueError, match="refused") as e:
            checkpoint.load(bad)
        assert "\n" not in str(e.value) and named in str(e.value) and str(bad) in str(e.value)
        capsys.readouterr()
        assert cli_main(["eval", str(bad), "--agents", "", "--out", str(tmp_path / "ev")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and named in err, err
        cfg = load_config(None, [*TINY, f"transfer.checkpoint={bad}", "sim.sensors=[depth]"])
        with pytest.raises(ValueError, match=named):
            apply_transfer(None, cfg, None, log=lambda *_: None)
    assert not marker.exists()
    # the benign one holds no policy: one line naming the first key ddppo's mapping does not know
    assert cli_main(["eval", str(tmp_path / "benign.pth"), "--agents", "", "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not in the checkpoint" in err, err

