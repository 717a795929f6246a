"""``ddppo bench peer``: the sb3 VecEnv adapter keeps sb3's contract and our environment's observations, the peers'
features extractor is ddppo's encoder, a tiny benchmark runs end to end, and without the extra the command fails in
one line.

stable-baselines3 and sb3-contrib are in the ``dev`` extra, so CI runs these; elsewhere they skip without them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from tiny import TINY_AGENT

from ddppo.config import load_config
from ddppo.launch.cli import main as cli_main
from ddppo.policy import Policy
from ddppo.sim.environments import make_vector_env

needs_sb3 = pytest.mark.skipif(
    find_spec("stable_baselines3") is None or find_spec("sb3_contrib") is None,
    reason='stable-baselines3 / sb3-contrib not installed (pip install -e ".[dev]" or ".[bench]")',
)

TINY = [*TINY_AGENT, "ppo.num_envs=4", "ppo.num_steps=8", "task.max_episode_steps=20"]


def config(data_dir, *extra):
    return load_config(None, [*TINY, f"task.data_dir={data_dir}", *extra])


def assert_obs_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=f"{what}: {k}")


@needs_sb3
def test_vec_env_adapter_keeps_sb3_contract_and_our_observations(small_dataset):
    from gymnasium import spaces
    from stable_baselines3.common.utils import check_for_correct_spaces
    from stable_baselines3.common.vec_env import VecCheckNan, VecMonitor

    from ddppo.bench.peer import SB3VecEnv

    cfg = config(small_dataset, "task.max_episode_steps=4")
    n = 3
    ours = make_vector_env(cfg, "train", n, seed=5)
    adapter = SB3VecEnv(make_vector_env(cfg, "train", n, seed=5))
    check_for_correct_spaces(adapter, adapter.observation_space, spaces.Discrete(4))
    # sb3's own wrappers on top: NaN checks raise, the monitor reads dones and infos to count episodes
    venv = VecMonitor(VecCheckNan(adapter, raise_exception=True))
    obs = venv.reset()
    assert_obs_equal(obs, {k: v.numpy() for k, v in ours.reset().items()}, "reset")
    # env 0 calls STOP at once (terminated after 1 step), the others move until the 4-step limit (truncated)
    plan = [[0, 1, 2], [1, 1, 3], [2, 1, 1], [1, 3, 1], [0, 1, 1], [1, 2, 1]]
    episode_return = np.zeros(n)
    lengths, ends = np.zeros(n, int), {"terminated": 0, "truncated": 0}
    for t, a in enumerate(plan):
        for e in range(n):
            assert adapter.observation_space.contains({k: v[e] for k, v in obs.items()}), f"step {t} env {e}"
        obs, rewards, dones, infos = venv.step(np.array(a))
        ref = ours.step(torch.tensor(a))
        assert_obs_equal(obs, {k: v.numpy() for k, v in ref.obs.items()}, f"step {t}")
        np.testing.assert_array_equal(rewards, ref.reward.numpy())
        np.testing.assert_array_equal(dones, ref.done.numpy())
        episode_return += rewards
        lengths += 1
        for e in range(n):
            if not dones[e]:
                assert "terminal_observation" not in infos[e] and "episode" not in infos[e]
                continue
            final = {k: v[e].numpy() for k, v in ref.final_obs.items()}
            assert_obs_equal(infos[e]["terminal_observation"], final, f"step {t} env {e} terminal observation")
            assert infos[e]["TimeLimit.truncated"] == bool(ref.truncated[e])
            ends["truncated" if ref.truncated[e] else "terminated"] += 1
            assert infos[e]["episode"]["l"] == lengths[e]
            assert infos[e]["episode"]["r"] == pytest.approx(episode_return[e], abs=1e-5)
            episode_return[e], lengths[e] = 0.0, 0
    assert ends["terminated"] >= 2 and ends["truncated"] >= 2, ends


@needs_sb3
def test_features_extractor_is_ddppo_encoder(small_dataset):
    from gymnasium import spaces

    from ddppo.bench.peer import DDPPOFeatures, SB3VecEnv
    from ddppo.policy import goal_features

    cfg = config(small_dataset, "sim.sensors=[rgb,depth]")
    env = make_vector_env(cfg, "train", 2, seed=0)
    space = SB3VecEnv(env).observation_space
    policy = Policy(env.obs_spaces, cfg.policy)
    policy_cfg = dict(cfg.policy)
    extractor = DDPPOFeatures(space, policy_cfg)
    for name in ("visual_input", "encoder", "visual_fc", "goal_embed"):
        mine, theirs = getattr(extractor, name), getattr(policy, name)
        assert [p.shape for p in mine.parameters()] == [p.shape for p in theirs.parameters()], name
        mine.load_state_dict(theirs.state_dict())
    obs = env.reset()
    with torch.no_grad():
        expected = torch.cat([policy.visual_fc(policy.encoder(policy.visual_input(obs))),
                              policy.goal_embed(goal_features(obs["pointgoal_with_gps_compass"]))], dim=-1)
        torch.testing.assert_close(extractor(obs), expected)
        # sb3 moves channel-last images channel-first (VecTransposeImage): the extractor must undo it
        hwc = space["rgb"].shape
        chw = spaces.Dict({**space.spaces, "rgb": spaces.Box(0, 255, (hwc[2], hwc[0], hwc[1]), np.uint8)})
        transposed = DDPPOFeatures(chw, policy_cfg)
        transposed.load_state_dict(extractor.state_dict())
        torch.testing.assert_close(transposed({**obs, "rgb": obs["rgb"].permute(0, 3, 1, 2)}), expected)
    assert DDPPOFeatures(space, policy_cfg, core_fc=True).features_dim == cfg.policy.hidden_size


@needs_sb3
def test_bench_peer_end_to_end_and_recorded(small_dataset, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    frames = 2 * 4 * 8  # two updates of 4 envs x 8 steps: the least that gives a rate after the first update
    argv = ["bench", "peer", "--frames", str(frames), "--val-episodes", "3", "--record", "--results", str(results),
            *TINY, f"task.data_dir={small_dataset}"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for name in ("ddppo", "ddppo_ff", "ppo", "recurrent_ppo"):
        assert out[f"fps_{name}"] > 0
        assert out[f"frames_{name}"] == frames
        assert 0.0 <= out[f"val_success_{name}"] <= 1.0
        assert out[f"peak_rss_mib_{name}"] > 50
        assert out[f"loadavg_{name}"] >= 0
    assert out["speedup_vs_recurrent_ppo"] == pytest.approx(out["fps_ddppo"] / out["fps_recurrent_ppo"])
    # like for like: feed-forward PPO against ddppo's feed-forward run, RecurrentPPO against the recurrent one
    assert out["speedup_vs_ppo"] == pytest.approx(out["fps_ddppo_ff"] / out["fps_ppo"])
    assert out["cpu_speedup_vs_ppo"] == pytest.approx(out["cpu_fps_ddppo_ff"] / out["cpu_fps_ppo"])
    assert out["cpu_speedup_vs_recurrent_ppo"] == pytest.approx(out["cpu_fps_ddppo"] / out["cpu_fps_recurrent_ppo"])
    assert out["speedup_recurrent_vs_ppo"] == pytest.approx(out["fps_ddppo"] / out["fps_ppo"])
    assert (out["num_envs"], out["num_steps"], out["val_episodes"]) == (4, 8, 3)
    text = results.read_text()
    assert "`ddppo bench peer --frames 64 --val-episodes 3 --record" in text
    assert "Machine: " in text and "torch " in text
    recorded = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert recorded == out


def test_bench_peer_without_sb3_fails_in_one_line(tmp_path):
    """The extra is optional: ddppo imports without it, and the command says how to install it, in one line."""
    code = textwrap.dedent("""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("stable_baselines3", "sb3_contrib"):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, Block())
        import ddppo, ddppo.bench.throughput, ddppo.launch.cli  # none needs the extra
        import ddppo.evaluation.evaluate, ddppo.trainer.loop
        sys.exit(ddppo.launch.cli.main(["bench", "peer", "--frames", "64"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "ddppo[bench]"' in lines[0], r.stderr


@needs_sb3
def test_bench_peer_repeats_report_the_median_of_alternating_rounds(small_dataset, capsys):
    """Two rounds, the second in reverse order: each ratio is the median of the rounds' ratios, each rate the median
    of its rounds, and only the first round's agents are evaluated (the rounds train the same agents)."""
    frames = 2 * 4 * 8
    argv = ["bench", "peer", "--frames", str(frames), "--val-episodes", "2", "--peers", "ppo", "--repeats", "2",
            *TINY, f"task.data_dir={small_dataset}", "policy.rnn_type=none"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["repeats"] == 2 and out["round_orders"] == [["ddppo", "ppo"], ["ppo", "ddppo"]]
    ratios = out["speedups_vs_ppo"]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    assert out["speedup_vs_ppo"] == pytest.approx(float(np.median(ratios)))
    assert ratios == pytest.approx([a / b for a, b in zip(out["fps_rounds_ddppo"], out["fps_rounds_ppo"])])
    assert "fps_ddppo_ff" not in out  # a feed-forward config: ddppo's own run is the like-for-like one
    for name in ("ddppo", "ppo"):
        assert out[f"fps_{name}"] > 0 and out[f"frames_{name}"] == frames
        assert out[f"fps_{name}"] == pytest.approx(float(np.median(out[f"fps_rounds_{name}"])))
        assert 0.0 <= out[f"val_success_{name}"] <= 1.0


@needs_sb3
def test_bench_peer_rejects_zero_repeats_before_training(capsys):
    assert cli_main(["bench", "peer", "--repeats", "0", "--peers", "ppo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--repeats 0" in err[0], err
