"""Benchmark bookkeeping: every ``ddppo bench`` result carries its peak memory, ``--record`` appends a dated entry
(exact command, machine, JSON) to the results file, and a training run reports each rank's peak memory."""

from __future__ import annotations

import json
import re

import pytest

from ddppo.bench.throughput import machine, record
from ddppo.config import load_config
from ddppo.launch.cli import main as cli_main
from ddppo.trainer.loop import train
from ddppo.trainer.peak_memory import peak_memory, peak_rss_mib, reset_peak_rss


def entries(text: str) -> list[tuple[str, dict]]:
    """(command, JSON) of every recorded entry, in file order."""
    found = re.findall(r"### `([^`]*)`, \d{4}-\d\d-\d\d \d\d:\d\d UTC\n\nMachine: [^\n]+\n\n```json\n(.*?)\n```",
                       text, flags=re.S)
    return [(cmd, json.loads(body)) for cmd, body in found]


def test_record_appends_dated_entries_after_existing_text(tmp_path):
    path = tmp_path / "bench" / "RESULTS.md"
    path.parent.mkdir()
    path.write_text("# Benchmark results\n\nhand-written table\n")
    record({"bench": "sim", "env_steps_per_s": 1.5}, "ddppo bench sim --num-envs 2", path)
    record({"bench": "train", "env_steps_per_s": 2.5, "machine": "box"}, "ddppo bench train x=1", path)
    text = path.read_text()
    assert text.startswith("# Benchmark results\n\nhand-written table\n")
    assert entries(text) == [("ddppo bench sim --num-envs 2", {"bench": "sim", "env_steps_per_s": 1.5}),
                             ("ddppo bench train x=1", {"bench": "train", "env_steps_per_s": 2.5, "machine": "box"})]
    # an entry without its own machine field gets this machine's description: CPU model, cores, torch version
    assert f"Machine: {machine()}\n" in text and "Machine: box\n" in text
    assert "cores" in machine() and "torch " in machine()


def test_peak_memory_counts_and_resets():
    ballast = bytearray(200 * 1024 * 1024)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touch every page, or it is never resident
    high = peak_rss_mib()
    assert high >= 200
    del ballast
    if reset_peak_rss():  # Linux: the next phase's peak starts from the current RSS
        assert peak_rss_mib() < high - 150
    assert set(peak_memory()) >= {"peak_rss_mib"}


def test_bench_sim_reports_memory_and_records_command(small_dataset, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    argv = ["bench", "sim", "--num-envs", "2", "--resolution", "16", "--steps", "5", "--warmup", "5",
            "--data-dir", str(small_dataset), "--record", "--results", str(results)]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_rss_mib"] > 50
    assert "cuda_max_allocated_mib" not in out  # CPU only: no CUDA figure to report
    [(command, recorded)] = entries(results.read_text())
    assert command == "ddppo " + " ".join(argv)
    assert recorded == out
    assert cli_main(argv[:-3]) == 0  # without --record nothing is appended
    assert len(entries(results.read_text())) == 1


def test_train_reports_peak_memory_per_rank(small_dataset, tmp_path):
    cfg = load_config(None, ["sim.resolution=16", "policy.encoder=simple_cnn", "policy.base_planes=8",
                             "policy.hidden_size=32", "policy.rnn_type=gru", "policy.num_recurrent_layers=1",
                             "ppo.num_envs=2", "ppo.num_steps=8", "total_steps=16", "eval_episodes=0", "device=cpu",
                             f"task.data_dir={small_dataset}", f"run_dir={tmp_path}", "name=mem"])
    result = train(cfg, fresh=True, log=lambda *_: None, show_progress=False)
    assert len(result["peak_rss_mib_per_rank"]) == 1 and result["peak_rss_mib_per_rank"][0] > 50
    summary = json.loads((tmp_path / "mem" / "summary.json").read_text())
    assert summary["peak_rss_mib_per_rank"] == result["peak_rss_mib_per_rank"]


def test_bench_train_end_to_end(small_dataset, tmp_path, capsys):
    """``ddppo bench train`` through the CLI: each term of the serial limit timed, the real trainer timed after its
    first update, and the ratio between them, recorded with its command."""
    results = tmp_path / "RESULTS.md"
    argv = ["bench", "train", "--updates", "2", "--record", "--results", str(results), "sim.resolution=16",
            "policy.base_planes=8", "policy.hidden_size=32", "ppo.num_envs=2", "ppo.num_steps=8", "device=cpu",
            f"task.data_dir={small_dataset}"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "train" and (out["num_envs"], out["num_steps"], out["updates_timed"]) == (2, 8, 2)
    per_step = out["t_sim_us_per_step"] + out["t_act_us_per_step"] + out["t_learn_us_per_step"]
    assert min(out["t_sim_us_per_step"], out["t_act_us_per_step"], out["t_learn_us_per_step"]) > 0
    assert out["serial_limit_env_steps_per_s"] == pytest.approx(1e6 / per_step)
    assert out["env_steps_per_s"] > 0
    assert out["ratio_to_serial_limit"] == pytest.approx(out["env_steps_per_s"] / out["serial_limit_env_steps_per_s"])
    assert out["peak_rss_mib"] > 50
    [(command, recorded)] = entries(results.read_text())
    assert command == "ddppo " + " ".join(argv) and recorded == out
