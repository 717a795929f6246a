"""Training and evaluating on real habitat-sim, end to end on the CPU: ``configs/pointnav/habitat_quickstart.yaml`` (the
quickstart's kind of agent on embedded floor plans exported as meshes) in its short form — progress on the console,
TensorBoard, checkpoints, SIGTERM then resume continuing exactly as an uninterrupted run, and ``ddppo eval`` with
SPL. habitat-sim renders through Mesa's software EGL here; each simulator process takes seconds to start, so the
runs are a few tiny updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny import tiny
from trainer_process import ddppo_command, sigterm_after_resume_state

from ddppo.config import load_config
from ddppo.io import checkpoint
from ddppo.launch.cli import main as cli_main
from ddppo.trainer.loop import train

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "pointnav" / "habitat_quickstart.yaml"
NUM_ENVS, NUM_STEPS = 2, 8
PER_UPDATE = NUM_ENVS * NUM_STEPS


def overrides(data: Path, runs: Path, *extra: str) -> list[str]:
    """The config's habitat backend on the exported dataset: a tiny agent, a few updates, training on val (the
    session's export holds that split only); no lr decay, whose schedule follows total_steps, which the interrupted
    run sets high)."""
    return [f"task.data_dir={data}", f"task.scenes_dir={data}", "task.split=val", "task.max_episode_steps=40",
            f"run_dir={runs}", "log_interval=1", "checkpoint_interval=1", "keep_checkpoints=2",
            f"num_threads={torch.get_num_threads()}", *tiny(NUM_ENVS, NUM_STEPS), "ppo.lr_decay=false", *extra]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def interrupted_run(data: Path, tmp_path: Path) -> tuple[str, int]:
    """`ddppo train` on habitat until the first resume state, then SIGTERM: (console output, update it stopped at)."""
    run_dir = tmp_path / "runs" / "hab"
    cmd = [*ddppo_command(), "train", "--config", str(CONFIG), *overrides(data, tmp_path / "runs", "name=hab"),
           "total_steps=10000000"]
    rc, out = sigterm_after_resume_state(cmd, run_dir, tmp_path / "first.log", timeout_s=300)
    assert rc == 0, out[-3000:]
    return out, checkpoint.load(run_dir / "resume.pt")["state"]["update"]


def test_habitat_backend_trains_resumes_exactly_and_evaluates(habitat_exported_dataset, tmp_path, capsys):
    data = habitat_exported_dataset
    out, stopped_at = interrupted_run(data, tmp_path)
    assert "signal" in out.lower() and stopped_at >= 1
    # habitat-sim ran (its own logs are quiet: tests/test_habitat_quiet.py), as the saved config says
    assert OmegaConf.load(tmp_path / "runs" / "hab" / "config.yaml").sim.backend == "habitat"

    # the same command continues to the target, ending where an uninterrupted run ends, to the bit
    target = (stopped_at + 2) * PER_UPDATE
    run_dir = tmp_path / "runs" / "hab"
    capsys.readouterr()
    assert cli_main(["train", "--config", str(CONFIG), *overrides(data, tmp_path / "runs", "name=hab"),
                     f"total_steps={target}"]) == 0
    assert f"resumed {run_dir} at update {stopped_at}" in capsys.readouterr().out
    resumed = checkpoint.load(run_dir / "resume.pt")
    assert resumed["state"]["env_steps"] == target
    ref = load_config(CONFIG, overrides(data, tmp_path / "ref", "name=hab", f"total_steps={target}"))
    summary = train(ref, log=lambda *_: None)
    assert summary["env_steps"] == target
    assert same_tensors(resumed["policy"], checkpoint.load(tmp_path / "ref" / "hab" / "resume.pt")["policy"])
    assert any((run_dir / "tb").iterdir())

    # ddppo eval on the habitat backend: every chosen episode once, SPL and the reference agents beside it
    ckpt = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    assert cli_main(["eval", str(ckpt), "--split", "val", "--episodes", "4", "--num-envs", "2",
                     "--agents", "oracle", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "summary.json").read_text())
    text = json.dumps(result)
    assert "spl" in text and "oracle" in text
    printed = capsys.readouterr().out
    assert "spl" in printed.lower()


@pytest.fixture(autouse=True)
def _quiet_habitat(monkeypatch):
    """habitat-sim and magnum log every simulator start to the console otherwise."""
    monkeypatch.setenv("HABITAT_SIM_LOG", "quiet")
    monkeypatch.setenv("MAGNUM_LOG", "quiet")
