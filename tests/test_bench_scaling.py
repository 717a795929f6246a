"""`ddppo bench scaling` end to end at toy size: four real torchrun launches (1 rank, 2 ranks, 2 ranks with a 2x
straggler without and with preemption) and the JSON they produce. The figures themselves live in
bench/RESULTS.md; a shared 2-core machine is too noisy to assert a speed here."""

from __future__ import annotations

import pytest
from tiny import TINY_AGENT

from ddppo.bench.throughput import bench_scaling
from ddppo.launch.cli import main as cli_main

TOY = [*TINY_AGENT, "ppo.num_envs=2", "ppo.num_steps=8", "ppo.num_mini_batch=1"]


@pytest.mark.timeout(900)
def test_bench_scaling_reports_every_setting(small_dataset):
    """Two rounds (``--repeats 2``): the second runs the four settings in reverse order, and every figure is the
    median of the rounds' (of two: their mean)."""
    out = bench_scaling([*TOY, f"task.data_dir={small_dataset}"], updates=2, port=29641, repeats=2)
    for key in ("fps_1_rank", "fps_2_ranks", "fps_2_ranks_straggler_no_preemption",
                "fps_2_ranks_straggler_preemption"):
        assert out[key] > 0, key
    assert out["straggler_sleep_s_per_step"] > 0
    # the preempted run really cut the straggler's rollouts (the fast rank always collects all: mean > 0.5);
    # the unpreempted one never did
    assert 0.5 < out["mean_rollout_fraction_preemption"] < 1
    assert out["mean_rollout_fraction_no_preemption"] == 1

    assert out["repeats"] == 2 and len(out["rounds"]) == 2
    assert out["round_orders"] == [["one", "two", "slow_off", "slow_on"], ["slow_on", "slow_off", "two", "one"]]
    for key in ("fps_1_rank", "scaling_efficiency", "preemption_speedup", "mean_rollout_fraction_preemption"):
        assert out[key] == pytest.approx(sum(rd[key] for rd in out["rounds"]) / 2), key
    for rd in out["rounds"]:
        assert rd["preemption_speedup"] == pytest.approx(
            rd["fps_2_ranks_straggler_preemption"] / rd["fps_2_ranks_straggler_no_preemption"])
    # each rank's thread budget under torchrun: one thread for torch and one for the renderer
    assert out["torch_threads_per_rank"] == {"one": [1], "two": [1, 1], "slow_off": [1, 1], "slow_on": [1, 1]}
    assert out["render_threads_per_rank"] == out["torch_threads_per_rank"]


def test_bench_scaling_refuses_zero_repeats_before_any_run(capsys):
    assert cli_main(["bench", "scaling", "--repeats", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--repeats 0" in err[0], err
