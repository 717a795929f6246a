"""The three switches of configs/pointnav/habitat_baselines.yaml that select habitat-baselines' behaviour where
ddppo's default differs, each checked against habitat-baselines' own code (the installed habitat-baselines
0.3.320260507) on the same inputs, not against a formula of ours:

- ``ppo.time_limit=terminal``: a real rollout of ddppo's trainer (``set_up``, ``collect_rollout``, ``update``) with
  3-step episodes, so the step limit cuts episodes inside it; its returns equal habitat-baselines'
  RolloutStorage.compute_returns (GAE, gamma and tau of ddppo_pointnav.yaml) on the environments' own rewards, the
  rollout's values and masks ``not done``, as its PPOTrainer._collect_environment_result stores them (habitat's
  Env ends an episode at ``max_episode_steps`` with ``episode_over``: done, no bootstrap);
- ``ddppo.grad_weighting=ranks``: two Gloo ranks (torchrun, CPU) with 16 and 6 samples; ddppo's trainer update
  against habitat-baselines' DDPPO updater (DistributedDataParallel around the actor-critic, as its trainer sets it
  up) on the same weights and minibatches (tests/helpers/hb_ddp_update.py): the gradients each stepped with and the
  weights after the step;
- ``policy.conv_init=torch_default``: the preset's policy and habitat-baselines' PointNavResNetPolicy (ResNet50,
  LSTM 2 x 512, RGB-D), parameter by parameter (matched through ddppo's checkpoint mapping), pooled over 4 seeds: the
  same constants where theirs are constant (GroupNorm, biases), else the same distribution (two-sample
  Kolmogorov-Smirnov distance below its 1e-6 critical value).

Skips with the reason where habitat_baselines does not import; fails instead where DDPPO_REQUIRE_SYSTEM is set.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from habitat_support import need_habitat_baselines
from tiny import TINY_AGENT, quiet

from ddppo.config import load_config
from ddppo.policy import GOAL_SENSOR, Policy
from ddppo.policy.habitat_baselines_weights import ddppo_state_dict

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "configs" / "pointnav" / "habitat_baselines.yaml"
DDPPO_POINTNAV = REPO / "tests" / "upstream" / "habitat_baselines" / "ddppo_pointnav.yaml"
HELPERS = Path(__file__).resolve().parent / "helpers"


@pytest.fixture(scope="module")
def hb():
    return need_habitat_baselines()


def ddppo_pointnav_path(hb) -> Path:
    """ddppo_pointnav.yaml as tests/test_habitat_baselines_parity.py composes it: the installed file where the
    install has one, else upstream's file kept verbatim in tests/upstream."""
    installed = Path(hb.__file__).parent / "config" / "pointnav" / "ddppo_pointnav.yaml"
    return installed if installed.is_file() else DDPPO_POINTNAV


def hb_rl_config(hb):
    """``habitat_baselines.rl`` of ddppo_pointnav.yaml composed by habitat-baselines' config system."""
    from habitat_baselines.config.default import get_config

    return get_config(str(ddppo_pointnav_path(hb))).habitat_baselines.rl


# ---------------------------------------------------------------------------------------------- ppo.time_limit
NUM_ENVS, NUM_STEPS, MAX_STEPS = 2, 8, 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from ddppo.sim.dataset_dir import generate_dataset

    out = tmp_path_factory.mktemp("switches") / "data"
    generate_dataset(out, load_config(None, ["dataset.scenes={train: 1, val: 1, test: 1}", "dataset.max_extent=6",
                                             "dataset.episodes_per_scene={train: 8, val: 2, test: 2}"]).dataset,
                     log=quiet)
    return out


def test_time_limit_returns_equal_habitat_baselines(hb, data_dir, tmp_path):
    """One rollout of the trainer with the preset's ppo settings (a tiny agent, 3-step episodes), and its update's
    returns, against habitat-baselines' compute_returns on the environments' rewards and ``not done`` masks."""
    from gym import spaces
    from habitat_baselines.common.rollout_storage import RolloutStorage as HBStorage

    from ddppo.trainer.loop import collect_rollout, finish, set_up, update
    from ddppo.trainer.records import StopRequest

    cfg = load_config(PRESET, [*TINY_AGENT, "policy.avgpool=1", f"ppo.num_envs={NUM_ENVS}",
                               f"ppo.num_steps={NUM_STEPS}", "ppo.num_mini_batch=1", "eval_episodes=0",
                               f"task.max_episode_steps={MAX_STEPS}", f"task.data_dir={data_dir}",
                               f"run_dir={tmp_path}", "name=time_limit", f"total_steps={NUM_ENVS * NUM_STEPS}"])
    assert cfg.ppo.time_limit == "terminal"
    run = set_up(cfg, fresh=True, log=quiet, show_progress=False)
    steps, env_step = [], run.envs.step

    def recorded_step(actions):  # what the environments returned, kept as they returned it
        result = env_step(actions)
        steps.append((result.reward.clone(), result.done.clone(), result.truncated.clone()))
        return result

    run.envs.step = recorded_step
    rollout = collect_rollout(run)
    update(run, rollout)  # the trainer's returns (GAE from where the rollout stopped), then its PPO update
    storage, s = run.storage, rollout.steps
    finish(run, StopRequest())
    rewards, done, truncated = (torch.stack(x) for x in zip(*steps))
    assert s == NUM_STEPS and (truncated & ~done).sum() == 0
    assert truncated[:-1].sum() >= NUM_ENVS  # the step limit cut episodes inside the rollout, not only at its end

    ppo = hb_rl_config(hb).ppo
    theirs = HBStorage(NUM_STEPS, NUM_ENVS, spaces.Dict({"x": spaces.Box(0, 1, (1,), np.float32)}),
                       spaces.Discrete(4), types.SimpleNamespace(num_recurrent_layers=1, recurrent_hidden_size=4))
    theirs.buffers["rewards"][:s] = rewards[..., None]  # the environments' rewards, as its trainer stores them
    theirs.buffers["value_preds"][:s] = storage.values[:s, :, None]
    theirs.buffers["masks"][1:s + 1] = ~done[..., None]  # [[not done] for done in dones]
    theirs.current_rollout_step_idxs = [s]
    theirs.compute_returns(storage.values[s, :, None], ppo.use_gae, ppo.gamma, ppo.tau)
    torch.testing.assert_close(storage.returns[:s], theirs.buffers["returns"][:s, :, 0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- ddppo.grad_weighting
@pytest.mark.distributed
def test_rank_weighted_gradients_equal_habitat_baselines_ddp(hb, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2",
           str(HELPERS / "hb_ddp_update.py"), str(tmp_path), str(ddppo_pointnav_path(hb))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    d0, d1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert (d0["num_samples"], d1["num_samples"]) == (16, 6)
    for d in (d0, d1):
        for name, theirs in d["theirs_grads"].items():
            torch.testing.assert_close(d["ours_grads"][name], theirs, rtol=1e-4, atol=1e-6 * theirs.abs().max(),
                                       msg=lambda m, n=name: f"gradient of {n}: {m}")
            torch.testing.assert_close(d["ours_state"][name], d["theirs_state"][name], rtol=1e-5, atol=1e-7,
                                       msg=lambda m, n=name: f"{n} after the step: {m}")
    for name in d0["ours_state"]:  # one update everywhere: every rank holds the same weights
        assert torch.equal(d0["ours_state"][name], d1["ours_state"][name]), name
        assert not torch.equal(d0["ours_state"][name], d0["init_state"][name]), name
    # the comparison can tell the weightings apart: samples-weighted gradients differ from habitat-baselines'
    flat = {k: torch.cat([g.flatten() for g in d0[k].values()]) for k in ("theirs_grads", "samples_grads")}
    assert (flat["samples_grads"] - flat["theirs_grads"]).norm() > 0.05 * flat["theirs_grads"].norm()


# ---------------------------------------------------------------------------------------------- policy.conv_init
RES, SEEDS, PER_SEED = 64, range(4), 25_000
"""Image side, seeds, and the most elements of one parameter drawn from each seed (large layers: a fixed random
subset, for a KS critical distance of 0.012 from 100k elements a side)."""


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, x, side="right") / a.size
                        - np.searchsorted(b, x, side="right") / b.size).max())


def test_initial_weights_have_habitat_baselines_statistics(hb):
    from gym import spaces
    from habitat_baselines.rl.ddppo.policy.resnet_policy import PointNavResNetPolicy

    cfg = load_config(PRESET, [f"sim.resolution={RES}"])
    assert cfg.policy.conv_init == "torch_default"
    ddppo_cfg = hb_rl_config(hb).ddppo
    ours_spaces = {"rgb": ((RES, RES, 3), torch.uint8), "depth": ((RES, RES, 1), torch.float32),
                   GOAL_SENSOR: ((2,), torch.float32)}
    hb_space = spaces.Dict({"rgb": spaces.Box(0, 255, (RES, RES, 3), np.uint8),
                            "depth": spaces.Box(0.0, 1.0, (RES, RES, 1), np.float32),
                            GOAL_SENSOR: spaces.Box(-math.inf, math.inf, (2,), np.float32)})
    ours: dict[str, list[np.ndarray]] = {}
    theirs: dict[str, list[np.ndarray]] = {}
    for seed in SEEDS:
        torch.manual_seed(1000 + seed)
        policy = Policy(ours_spaces, cfg.policy)
        torch.manual_seed(2000 + seed)
        hb_policy = PointNavResNetPolicy(hb_space, spaces.Discrete(4), hidden_size=cfg.policy.hidden_size,
                                         rnn_type=ddppo_cfg.rnn_type,
                                         num_recurrent_layers=ddppo_cfg.num_recurrent_layers,
                                         backbone=ddppo_cfg.backbone, normalize_visual_inputs=True)
        # habitat-baselines' weights under ddppo's names (shape for shape, or refused)
        mapped = ddppo_state_dict({"state_dict": hb_policy.state_dict()}, policy, "PointNavResNetPolicy")
        pick = np.random.default_rng(seed)
        for name, p in policy.named_parameters():
            a, b = p.detach().flatten().numpy(), mapped[name].flatten().numpy()
            if a.size > PER_SEED:
                a, b = a[pick.integers(0, a.size, PER_SEED)], b[pick.integers(0, b.size, PER_SEED)]
            ours.setdefault(name, []).append(a)
            theirs.setdefault(name, []).append(b)
    assert len(ours) > 150  # ResNet50, LSTM 2 x 512, heads
    kinds: dict[str, int] = {}
    for name in ours:
        a, b = np.concatenate(ours[name]), np.concatenate(theirs[name])
        if np.all(b == b[0]):  # GroupNorm's ones and zeros, the LSTM's and heads' zero biases
            assert np.all(a == b[0]), f"{name}: habitat-baselines has {b[0]} throughout, ddppo has {a[:4]}..."
            kinds["constant"] = kinds.get("constant", 0) + 1
            continue
        critical = 2.7 * math.sqrt((a.size + b.size) / (a.size * b.size))  # KS at alpha ~ 1e-6
        distance = ks_distance(a, b)
        assert distance < critical, (f"{name}: initial weights distributed unlike habitat-baselines' (KS {distance:.3f}"
                                     f" > {critical:.3f}; std {a.std():.4g} vs {b.std():.4g}, mean {a.mean():.3g} vs "
                                     f"{b.mean():.3g})")
        kinds["random"] = kinds.get("random", 0) + 1
    assert kinds["constant"] > 50 and kinds["random"] > 50
