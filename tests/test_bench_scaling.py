"""`ddppo bench scaling` end to end at toy size: four real torchrun launches (1 rank, 2 ranks, 2 ranks with a 2x
straggler without and with preemption) and the JSON they produce. The figures themselves live in
bench/RESULTS.md; a shared 2-core machine is too noisy to assert a speed here."""

from __future__ import annotations

import pytest
from tiny import TINY_AGENT

from ddppo.bench import bench_scaling

TOY = [*TINY_AGENT, "ppo.num_envs=2", "ppo.num_steps=8", "ppo.num_mini_batch=1"]


@pytest.mark.timeout(600)
def test_bench_scaling_reports_every_setting(small_dataset):
    out = bench_scaling([*TOY, f"task.data_dir={small_dataset}"], updates=2, port=29641)
    for key in ("fps_1_rank", "fps_2_ranks", "fps_2_ranks_straggler_no_preemption",
                "fps_2_ranks_straggler_preemption"):
        assert out[key] > 0, key
    assert out["preemption_speedup"] == pytest.approx(
        out["fps_2_ranks_straggler_preemption"] / out["fps_2_ranks_straggler_no_preemption"])
    assert out["straggler_sleep_s_per_step"] > 0
    # the preempted run really cut the straggler's rollouts (the fast rank always collects all: mean > 0.5);
    # the unpreempted one never did
    assert 0.5 < out["mean_rollout_fraction_preemption"] < 1
    assert out["mean_rollout_fraction_no_preemption"] == 1
