"""Tests of the visual encoders, visual input normalisation and the recurrent actor-critic policy."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from ddppo.config import Encoder, PolicyConfig, RnnType, VisualNormalization
from ddppo.policy import (
    ENCODERS,
    GOAL_SENSOR,
    Policy,
    RunningMeanAndVar,
    VisualInput,
    goal_features,
    make_encoder,
)
from ddppo.policy.encoders.base import in_memory_format
from ddppo.policy.packing import episode_segments
from ddppo.policy.policy import block_mean
from ddppo.policy.precision import has_native_bfloat16, resolve_encoder_dtype

NUM_ACTIONS = 4


def spaces(hw: int | None = 32, rgb: bool = True, depth: bool = True, goal: bool = True) -> dict:
    s = {}
    if hw is not None and rgb:
        s["rgb"] = ((hw, hw, 3), torch.uint8)
    if hw is not None and depth:
        s["depth"] = ((hw, hw, 1), torch.float32)
    if goal:
        s[GOAL_SENSOR] = ((2,), torch.float32)
    # Extra sensors must be ignored by the policy.
    s["compass"] = ((1,), torch.float32)
    return s


def random_obs(obs_spaces: dict, *lead: int, gen: torch.Generator | None = None) -> dict:
    obs = {}
    for key, (shape, dtype) in obs_spaces.items():
        if dtype == torch.uint8:
            obs[key] = torch.randint(0, 256, (*lead, *shape), dtype=torch.uint8, generator=gen)
        else:
            obs[key] = torch.rand((*lead, *shape), generator=gen)
    if GOAL_SENSOR in obs:
        obs[GOAL_SENSOR][..., 0] *= 10.0
        obs[GOAL_SENSOR][..., 1] = (obs[GOAL_SENSOR][..., 1] - 0.5) * 2 * torch.pi
    return obs


def small_policy(obs_spaces: dict, **kw) -> Policy:
    """A policy of the given settings over a small default (simple_cnn, hidden size 32); the settings pass through
    OmegaConf's structured config, as a loaded config's do (so a bad choice is refused there)."""
    cfg = OmegaConf.merge(OmegaConf.structured(PolicyConfig(encoder="simple_cnn", hidden_size=32)), kw)
    return Policy(obs_spaces, cfg, num_actions=NUM_ACTIONS)


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("sensors", ["depth", "rgbd"])
def test_encoder_shapes_and_stages(name: str, sensors: str) -> None:
    torch.manual_seed(0)
    obs_spaces = spaces(64, rgb=sensors == "rgbd", depth=True)
    policy = small_policy(obs_spaces, encoder=name).eval()
    obs = random_obs(obs_spaces, 2)
    x = policy.visual_input(obs)
    assert x.shape == (2, 4 if sensors == "rgbd" else 1, 64, 64)
    feats = policy.encoder(x)
    assert feats.shape == (2, policy.encoder.output_size)
    if name != "simple_cnn":
        # Compression targets ~2048 flat features whatever the final map size.
        assert abs(policy.encoder.output_size - 2048) <= 64
    stages = policy.encoder.stages(x)
    assert isinstance(stages, list) and len(stages) >= 3
    assert all(s.dim() == 4 and s.shape[0] == 2 for s in stages)
    assert torch.allclose(stages[-1].flatten(1), feats)
    logits, value, hidden = policy(obs, torch.zeros(2, dtype=torch.long), torch.ones(2), policy.initial_hidden(2))
    assert logits.shape == (2, NUM_ACTIONS) and value.shape == (2,)
    assert torch.isfinite(logits).all() and torch.isfinite(value).all()


@pytest.mark.parametrize("rnn_type", ["none", "gru"])
def test_forward_equals_its_submodules_called_as_modules(rnn_type: str) -> None:
    """The policy applies its per-step layers as functions (a module call costs as much as a small layer): the
    result must be exactly what calling every submodule as a module gives."""
    torch.manual_seed(0)
    obs_spaces = spaces(32, rgb=False)
    policy = small_policy(obs_spaces, rnn_type=rnn_type, num_recurrent_layers=1).eval()
    obs = random_obs(obs_spaces, 3)
    prev = torch.tensor([0, 2, 3])
    masks = torch.tensor([1.0, 0.0, 1.0])  # env 1 starts an episode: "no previous action", zero state
    hidden = torch.randn(policy.num_hidden_layers, 3, 32)
    logits, value, new_hidden = policy(obs, prev, masks, hidden)

    stages = policy.encoder.stages(policy.visual_input(obs))  # Sequential(Conv2d, ReLU) modules
    x = torch.cat([policy.visual_fc(stages[-1].flatten(1)), policy.goal_embed(goal_features(obs[GOAL_SENSOR])),
                   policy.action_embed(torch.tensor([1, 0, 4]))], dim=-1)
    if rnn_type == "none":
        out, expected_hidden = policy.core(x), hidden
    else:
        out, expected_hidden = policy.core(x.unsqueeze(0), hidden * masks.view(1, -1, 1))
        out = out.squeeze(0)
    assert torch.equal(logits, policy.actor(out))
    assert torch.equal(value, policy.critic(out).squeeze(-1))
    assert torch.equal(new_hidden, expected_hidden)


def test_in_memory_format_gives_exact_strides() -> None:
    one = torch.rand(2, 5, 7, 1).permute(0, 3, 1, 2)  # counts as contiguous in both formats, strides channels-last
    assert one.is_contiguous() and one.is_contiguous(memory_format=torch.channels_last)
    nchw = in_memory_format(one, torch.contiguous_format)
    assert nchw.stride() == (35, 35, 7, 1) and torch.equal(nchw, one)
    assert in_memory_format(nchw, torch.contiguous_format) is nchw  # no copy when the strides already match
    assert in_memory_format(one, torch.channels_last) is one
    four = torch.rand(2, 4, 5, 7)
    cl = in_memory_format(four, torch.channels_last)
    assert cl.stride() == (140, 1, 28, 4) and torch.equal(cl, four)


@pytest.mark.parametrize("name,layout", [("simple_cnn", "channels_last"), ("resnet18", "nchw"),
                                         ("squeezenet1_1", "nchw")])
@pytest.mark.parametrize("c", [1, 4])
def test_encoders_run_in_their_memory_format_whatever_the_input(name: str, layout: str, c: int) -> None:
    """SimpleCNN runs channels-last, the GroupNorm encoders NCHW (each the faster on the CPU), whichever layout the
    input comes in; the features are the same either way."""
    torch.manual_seed(0)
    enc = make_encoder(name, c, (32, 32), 8, 4).eval()
    first_conv = next(m for m in enc.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    first_conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].stride()))
    want = (c * 1024, 1, 32 * c, c) if layout == "channels_last" else (c * 1024, 1024, 32, 1)
    x = torch.rand(3, 32, 32, c)
    outs = []
    for inp in (x.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format)):
        outs.append(enc.stages(inp)[-1].flatten(1))
        assert seen[-1] == want, (inp.stride(), seen[-1])
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(enc(x.permute(0, 3, 1, 2)), outs[0])


def test_resnet18_avgpool_128() -> None:
    obs_spaces = spaces(128)
    policy = small_policy(obs_spaces, encoder="resnet18", avgpool=2).eval()
    obs = random_obs(obs_spaces, 2)
    x = policy.visual_input(obs)
    assert x.shape == (2, 4, 64, 64)
    assert policy.encoder(x).shape == (2, policy.encoder.output_size)
    assert len(policy.encoder.stages(x)) == 6  # stem, 4 residual stages, compression


def test_simple_cnn_small_inputs() -> None:
    for hw in [(32, 32), (64, 64), (48, 40)]:
        enc = make_encoder("simple_cnn", 1, hw)
        assert enc(torch.rand(3, 1, *hw)).shape == (3, enc.output_size)


def test_every_encoder_choice_has_a_constructor() -> None:
    """The config's Encoder choice (validated when a config loads) and the encoder registry name the same set."""
    assert set(ENCODERS) == {e.value for e in Encoder}


# ---------------------------------------------------------------- visual input / normaliser


def test_visual_input_layout_and_pooling() -> None:
    obs_spaces = spaces(8)
    obs = random_obs(obs_spaces, 2)
    vi = VisualInput(obs_spaces, avgpool=1, normalize=False)
    x = vi(obs)
    assert torch.allclose(x[:, :3], obs["rgb"].permute(0, 3, 1, 2).float() / 255.0)
    assert torch.allclose(x[:, 3:], obs["depth"].permute(0, 3, 1, 2))
    pooled = VisualInput(obs_spaces, avgpool=2, normalize=False)(obs)
    assert pooled.shape == (2, 4, 4, 4)
    assert torch.allclose(pooled[:, :, 0, 0], x[:, :, :2, :2].mean(dim=(2, 3)))


@pytest.mark.parametrize("shape,k", [((3, 17, 20, 3), 4), ((2, 64, 64, 1), 8), ((1, 9, 9, 2), 3)])
def test_block_mean_equals_avg_pool(shape, k) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 10
    expected = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), k, k).permute(0, 2, 3, 1)
    assert torch.allclose(block_mean(x, k), expected, atol=1e-5)
    as_uint8 = (x * 20).to(torch.uint8)
    expected = torch.nn.functional.avg_pool2d(as_uint8.permute(0, 3, 1, 2).float(), k, k).permute(0, 2, 3, 1)
    assert torch.allclose(block_mean(as_uint8, k), expected, atol=1e-4)


@pytest.mark.parametrize("avgpool", [1, 4])
def test_stored_observations_give_the_same_outputs(avgpool) -> None:
    """The rollout storage keeps ``preprocess``ed (pooled) observations: acting and re-evaluating on them must
    equal acting on the raw observations, and the storage spaces must describe them."""
    obs_spaces = spaces(64)
    policy = small_policy(obs_spaces, avgpool=avgpool).eval()
    raw = random_obs(obs_spaces, 3, gen=torch.Generator().manual_seed(1))
    stored = policy.preprocess(raw)
    for key, (shape, dtype) in policy.storage_spaces(obs_spaces).items():
        assert stored[key].shape[1:] == shape and stored[key].dtype == dtype, key
    if avgpool > 1:
        assert stored["rgb"].shape[1:3] == (64 // avgpool, 64 // avgpool)
    hidden = policy.initial_hidden(3)
    prev, masks = torch.tensor([0, 1, 2]), torch.ones(3)
    logits_raw, value_raw, _ = policy(raw, prev, masks, hidden)
    logits_stored, value_stored, _ = policy(stored, prev, masks, hidden)
    assert torch.allclose(logits_raw, logits_stored, atol=1e-5) and torch.allclose(value_raw, value_stored, atol=1e-5)


def test_running_mean_and_var_converges() -> None:
    gen = torch.Generator().manual_seed(0)
    true_mean = torch.tensor([0.2, -1.0, 3.0])
    true_std = torch.tensor([0.5, 2.0, 0.1])
    norm = RunningMeanAndVar(3)
    batches = [
        torch.randn(16, 3, 8, 8, generator=gen) * true_std.view(1, 3, 1, 1) + true_mean.view(1, 3, 1, 1)
        for _ in range(40)
    ]
    for b in batches:
        norm(b)
    assert torch.allclose(norm.mean.flatten(), true_mean, atol=0.02)
    assert torch.allclose(norm.var.flatten().sqrt(), true_std, rtol=0.03)
    # The incremental update must equal the statistics of all data seen at once.
    all_data = torch.cat(batches).double()
    assert torch.allclose(norm.mean.flatten().double(), all_data.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.var.flatten().double(), all_data.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4)
    assert norm.count.item() == 16 * 40
    assert {"mean", "var", "count"} <= set(norm.state_dict())
    # Normalised output is ~standard and eval mode freezes the statistics.
    norm.eval()
    before = norm.mean.clone()
    out = norm(batches[0] * 5)
    assert torch.equal(norm.mean, before)
    out = norm(batches[1])
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.1)


def _dist_worker(rank: int, world: int, port: int, data: torch.Tensor, out_path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        norm = RunningMeanAndVar(data.shape[1])
        per_rank = data.shape[0] // world
        # Unequal batch sizes across ranks are a realistic case (different rollout lengths).
        for chunk in data[rank * per_rank : (rank + 1) * per_rank].split([3, 5]):
            norm(chunk)
        if rank == 0:
            torch.save(norm.state_dict(), out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_running_mean_and_var_distributed_sync(tmp_path) -> None:
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(16, 2, 4, 4, generator=gen) * 3 + 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "stats.pt")
    mp.spawn(_dist_worker, args=(2, port, data, out), nprocs=2, join=True)
    synced = torch.load(out)
    assert synced["count"].item() == 16
    all_data = data.double()
    assert torch.allclose(synced["mean"].flatten().double(), all_data.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(synced["var"].flatten().double(), all_data.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4)


# ---------------------------------------------------------------- policy


def test_goal_features_convention() -> None:
    goal = torch.tensor([[2.0, 0.3], [1.0, -1.2]])
    f = goal_features(goal)
    assert torch.allclose(f, torch.stack([goal[:, 0], goal[:, 1].cos(), goal[:, 1].sin()], -1))
    # habitat-baselines' form: the reading's angle is -phi, its features are [rho, cos phi, sin phi]
    phi = -goal[:, 1]
    assert torch.allclose(goal_features(goal, "negated"), torch.stack([goal[:, 0], phi.cos(), phi.sin()], -1))


def test_goal_angle_forms_differ_by_one_weight_column() -> None:
    """The two goal-feature forms compute the same policy once the sin column of the goal embedding is negated."""
    obs_spaces = spaces(None)
    torch.manual_seed(0)
    as_read = small_policy(obs_spaces, rnn_type="gru", num_recurrent_layers=1).eval()
    negated = small_policy(obs_spaces, rnn_type="gru", num_recurrent_layers=1, goal_angle="negated").eval()
    state = as_read.state_dict()
    state["goal_embed.weight"] = state["goal_embed.weight"] * torch.tensor([1.0, 1.0, -1.0])
    negated.load_state_dict(state)
    obs = random_obs(obs_spaces, 6, gen=torch.Generator().manual_seed(1))
    args = (obs, torch.zeros(6, dtype=torch.long), torch.zeros(6), as_read.initial_hidden(6))
    for a, b in zip(as_read(*args), negated(*args)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("setting,rgb,normalised", [("always", False, True), ("never", True, False),
                                                     ("auto", True, True), ("auto", False, False)])
def test_normalize_visual_settings(setting: str, rgb: bool, normalised: bool) -> None:
    """auto normalises only when RGB is present (habitat-baselines' rule)."""
    policy = small_policy(spaces(32, rgb=rgb), normalize_visual=setting)
    assert isinstance(policy.visual_input.normalizer, RunningMeanAndVar) == normalised


def test_compression_groups_and_torch_default_init() -> None:
    torch.manual_seed(0)
    ddppo_style = small_policy(spaces(64), encoder="resnet18", base_planes=16, ngroups=8)
    habitat_style = small_policy(spaces(64), encoder="resnet18", base_planes=16, ngroups=8, compression_groups=1,
                                 conv_init="torch_default")
    width = ddppo_style.encoder.compression[1].num_channels
    assert ddppo_style.encoder.compression[1].num_groups == 8 and habitat_style.encoder.compression[1].num_groups == 1
    assert habitat_style.encoder.compression[1].num_channels == width
    # PyTorch's default conv init is uniform in +-1/sqrt(fan_in); Kaiming-normal (fan-out) draws beyond it
    for name, module in habitat_style.encoder.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            bound = 1 / module.weight[0].numel() ** 0.5
            assert module.weight.abs().max() <= bound + 1e-7, name
    stem = ddppo_style.encoder.stem[0].weight
    assert stem.abs().max() > 1 / stem[0].numel() ** 0.5


def test_blind_policy() -> None:
    obs_spaces = spaces(None)
    policy = small_policy(obs_spaces, rnn_type="gru", num_recurrent_layers=1)
    assert policy.encoder is None and policy.visual_input is None and policy.visual_fc is None
    assert policy.num_hidden_layers == 1
    obs = random_obs(obs_spaces, 5)
    actions, log_probs, values, hidden = policy.act(
        obs, torch.zeros(5, dtype=torch.long), torch.zeros(5), policy.initial_hidden(5)
    )
    assert actions.shape == (5,) and actions.dtype == torch.long
    assert log_probs.shape == (5,) and values.shape == (5,) and hidden.shape == (1, 5, 32)


def test_hidden_state_layout() -> None:
    lstm = small_policy(spaces(None), rnn_type="lstm", num_recurrent_layers=2)
    gru = small_policy(spaces(None), rnn_type="gru", num_recurrent_layers=3)
    assert lstm.num_hidden_layers == 4 and gru.num_hidden_layers == 3
    assert lstm.initial_hidden(6).shape == (4, 6, 32)
    assert not lstm.initial_hidden(6).any()
    with pytest.raises(ValueError):
        lstm(random_obs(spaces(None), 2), torch.zeros(2), torch.ones(2), gru.initial_hidden(2))


def test_feed_forward_core_has_no_state() -> None:
    torch.manual_seed(0)
    ff = small_policy(spaces(None), rnn_type="none", num_recurrent_layers=2)
    assert ff.num_hidden_layers == 0 and ff.initial_hidden(3).shape == (0, 3, 32)
    assert isinstance(ff.core[0], torch.nn.Linear) and ff.core[0].out_features == 32
    obs = random_obs(spaces(None), 3)
    prev = torch.tensor([1, 2, 3])
    logits, values, hidden = ff(obs, prev, torch.ones(3), ff.initial_hidden(3))
    assert hidden.shape == (0, 3, 32)
    # the same observation and previous action give the same output whatever came before ...
    again, _, _ = ff(obs, prev, torch.ones(3), hidden)
    torch.testing.assert_close(logits, again)
    # ... and an episode start still drops the previous action
    started, _, _ = ff(obs, prev, torch.zeros(3), hidden)
    fresh, _, _ = ff(obs, torch.zeros(3, dtype=torch.long), torch.zeros(3), hidden)
    torch.testing.assert_close(started, fresh)
    assert not torch.allclose(started, logits)


def test_actor_init_gives_near_uniform_policy() -> None:
    torch.manual_seed(0)
    obs_spaces = spaces(32)
    policy = small_policy(obs_spaces, hidden_size=512).eval()
    obs = random_obs(obs_spaces, 8)
    logits, values, _ = policy(obs, torch.randint(0, 4, (8,)), torch.ones(8), policy.initial_hidden(8))
    assert logits.abs().max() < 0.05
    probs = logits.softmax(-1)
    assert (probs - 1 / NUM_ACTIONS).abs().max() < 0.01
    assert torch.all(policy.actor.bias == 0) and torch.all(policy.critic.bias == 0)


def test_masks_reset_hidden_and_prev_action() -> None:
    torch.manual_seed(0)
    obs_spaces = spaces(32)
    policy = small_policy(obs_spaces).eval()
    n = 3
    hidden = policy.initial_hidden(n)
    for _ in range(4):
        obs = random_obs(obs_spaces, n)
        _, _, hidden = policy(obs, torch.randint(0, 4, (n,)), torch.ones(n), hidden)
    assert hidden.abs().sum() > 0
    obs = random_obs(obs_spaces, n)
    stale = policy(obs, torch.tensor([1, 2, 3]), torch.zeros(n), hidden)
    fresh = policy(obs, torch.tensor([0, 3, 1]), torch.zeros(n), policy.initial_hidden(n))
    for a, b in zip(stale, fresh):
        assert torch.allclose(a, b, atol=1e-6)
    # Bool masks mean the same as float masks, and a kept state really changes the output.
    as_bool = policy(obs, torch.tensor([1, 2, 3]), torch.zeros(n, dtype=torch.bool), hidden)
    assert torch.allclose(as_bool[0], stale[0])
    kept = policy(obs, torch.tensor([1, 2, 3]), torch.ones(n), hidden)
    assert not torch.allclose(kept[0], stale[0], atol=1e-6)


@pytest.mark.parametrize("rnn_type,encoder", [("lstm", "simple_cnn"), ("gru", "simple_cnn"), ("lstm", "resnet18"),
                                              ("none", "simple_cnn")])
def test_evaluate_actions_matches_stepwise_forward(rnn_type: str, encoder: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    obs_spaces = spaces(32)
    policy = small_policy(obs_spaces, encoder=encoder, rnn_type=rnn_type, num_recurrent_layers=2)
    # Give the normaliser non-trivial statistics, then freeze them as during a PPO update's comparison.
    policy.train()
    policy.visual_input(random_obs(obs_spaces, 4, gen=gen))
    policy.eval()

    t_len, n = 9, 4
    obs_seq = random_obs(obs_spaces, t_len, n, gen=gen)
    prev_actions = torch.randint(0, NUM_ACTIONS, (t_len, n), generator=gen)
    actions = torch.randint(0, NUM_ACTIONS, (t_len, n), generator=gen)
    masks = torch.ones(t_len, n)
    masks[0, 1] = 0  # reset at the very first step
    masks[3, 0] = 0
    masks[3, 2] = 0
    masks[6, 2] = 0
    masks[8, 3] = 0  # reset on the last step
    hidden0 = torch.randn(policy.num_hidden_layers, n, 32, generator=gen) * 0.5

    with torch.no_grad():
        log_probs, values, entropy = policy.evaluate_actions(obs_seq, prev_actions, masks, hidden0, actions)
        hidden = hidden0
        step_lp, step_v, step_ent = [], [], []
        for t in range(t_len):
            obs_t = {k: v[t] for k, v in obs_seq.items()}
            logits, value, hidden = policy(obs_t, prev_actions[t], masks[t], hidden)
            dist = torch.distributions.Categorical(logits=logits)
            step_lp.append(dist.log_prob(actions[t]))
            step_v.append(value)
            step_ent.append(dist.entropy())
    assert log_probs.shape == values.shape == entropy.shape == (t_len, n)
    torch.testing.assert_close(log_probs, torch.stack(step_lp), atol=1e-5, rtol=0)
    torch.testing.assert_close(values, torch.stack(step_v), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, torch.stack(step_ent), atol=1e-5, rtol=0)


def test_evaluate_actions_gradients_flow() -> None:
    obs_spaces = spaces(32)
    policy = small_policy(obs_spaces)
    t_len, n = 4, 2
    obs_seq = random_obs(obs_spaces, t_len, n)
    masks = torch.ones(t_len, n)
    masks[2, 0] = 0
    lp, v, ent = policy.evaluate_actions(
        obs_seq, torch.zeros(t_len, n), masks, policy.initial_hidden(n), torch.ones(t_len, n)
    )
    (lp.sum() + v.sum() + ent.sum()).backward()
    for name in ["encoder", "visual_fc", "goal_embed", "action_embed", "core", "actor", "critic"]:
        grads = [p.grad for p in getattr(policy, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_act_deterministic_is_argmax() -> None:
    obs_spaces = spaces(32, rgb=False)
    policy = small_policy(obs_spaces).eval()
    obs = random_obs(obs_spaces, 6)
    args = (obs, torch.zeros(6, dtype=torch.long), torch.ones(6), policy.initial_hidden(6))
    logits, values, _ = policy(*args)
    actions, log_probs, act_values, _ = policy.act(*args, deterministic=True)
    assert torch.equal(actions, logits.argmax(-1))
    assert torch.allclose(log_probs, logits.log_softmax(-1).gather(1, actions[:, None]).squeeze(1))
    assert torch.allclose(act_values, values)


def _cfg() -> PolicyConfig:
    return PolicyConfig(encoder=Encoder.simple_cnn, base_planes=16, ngroups=8, hidden_size=32, rnn_type=RnnType.gru,
                        num_recurrent_layers=1, avgpool=2, normalize_visual=VisualNormalization.never)


# ---------------------------------------------------------------- encoder precision


def _policy_pair(encoder: str, precision: str) -> tuple[Policy, Policy]:
    """A float32 policy and a copy of it whose encoder computes in ``precision``."""
    torch.manual_seed(0)
    ref = small_policy(spaces(32), encoder=encoder, rnn_type="gru", num_recurrent_layers=1).eval()
    other = small_policy(spaces(32), encoder=encoder, rnn_type="gru", num_recurrent_layers=1,
                         encoder_precision=precision).eval()
    other.load_state_dict(ref.state_dict())
    return ref, other


@pytest.mark.parametrize("encoder,feature_err,min_cos", [("simple_cnn", 1e-2, 0.999), ("resnet18", 3e-2, 0.9)])
def test_bfloat16_encoder_is_float32_within_bf16_rounding(encoder: str, feature_err: float, min_cos: float) -> None:
    ref, bf16 = _policy_pair(encoder, "bfloat16")
    x = ref.visual_input(random_obs(spaces(32), 16, gen=torch.Generator().manual_seed(3)))
    exact, rounded = ref.encode(x), bf16.encode(x)
    assert exact.dtype == rounded.dtype == torch.float32 and not torch.equal(exact, rounded)
    # bf16 keeps 8 significant bits (relative spacing 2^-8 = 0.4%); three convolutions stay well under 1%
    rel = (rounded - exact).norm() / exact.norm()
    assert 1e-4 < rel < feature_err, float(rel)
    # the weights stay float32 and get float32 gradients pointing the way float32 arithmetic's do. Through
    # ResNet18's 20 layers and GroupNorms the first layers' gradients drift further (~0.95 cosine at initialisation)
    for policy in (ref, bf16):
        policy.encode(x).square().mean().backward()
    for (name, p), q in zip(ref.encoder.named_parameters(), bf16.encoder.parameters()):
        assert q.dtype == q.grad.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > min_cos, (name, float(cos))


def test_bfloat16_policy_evaluates_as_it_acted() -> None:
    """PPO's first ratio is 1 only if re-evaluating a rollout (all frames in one batch) gives the log-probabilities
    acting gave step by step: the same bf16 arithmetic in both, so only batch-size-dependent rounding remains."""
    ref, bf16 = _policy_pair("simple_cnn", "bfloat16")
    gen = torch.Generator().manual_seed(5)
    t_len, n = 6, 4
    obs_seq = random_obs(spaces(32), t_len, n, gen=gen)
    prev = torch.randint(0, NUM_ACTIONS, (t_len, n), generator=gen)
    masks = torch.ones(t_len, n)
    masks[2, 1] = 0
    with torch.no_grad():
        hidden, step_lp = bf16.initial_hidden(n), []
        for t in range(t_len):
            actions, lp, _, hidden = bf16.act({k: v[t] for k, v in obs_seq.items()}, prev[t], masks[t], hidden)
            step_lp.append(lp)
            if t + 1 < t_len:
                prev[t + 1] = actions
        taken = torch.cat([prev[1:], actions[None]])
        lp_bf16 = bf16.evaluate_actions(obs_seq, prev, masks, bf16.initial_hidden(n), taken)[0]
        lp_fp32 = ref.evaluate_actions(obs_seq, prev, masks, ref.initial_hidden(n), taken)[0]
    torch.testing.assert_close(lp_bf16, torch.stack(step_lp), atol=2e-3, rtol=0)
    assert not torch.equal(lp_bf16, lp_fp32)


def test_encoder_precision_auto_follows_the_hardware() -> None:
    cpu = torch.device("cpu")
    assert resolve_encoder_dtype("float32", cpu) == torch.float32
    assert resolve_encoder_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_encoder_dtype("auto", cpu) == (torch.bfloat16 if has_native_bfloat16(cpu) else torch.float32)
    cpuinfo = "/proc/cpuinfo"
    if os.path.exists(cpuinfo):  # independent truth: the CPU's own flags
        flags = set(open(cpuinfo).read().split())
        assert has_native_bfloat16(cpu) == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_policy_from_a_policy_config() -> None:
    policy = Policy(spaces(64), _cfg(), num_actions=NUM_ACTIONS)
    assert policy.rnn_type == "gru" and policy.num_hidden_layers == 1 and policy.hidden_size == 32
    assert policy.visual_input.output_hw == (32, 32)
    assert isinstance(policy.visual_input.normalizer, torch.nn.Identity)
    assert policy.action_embed.num_embeddings == NUM_ACTIONS + 1


# ---------------------------------------------------------------- packed recurrent core


def test_episode_segments_by_hand() -> None:
    # env 0 resets at t=2; env 1 starts a new episode at t=0 and again at t=3; T=4
    masks = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0]], dtype=torch.bool)
    seg = episode_segments(masks)
    # segments (env, start, length): (0,0,2) (0,2,2) (1,0,3) (1,3,1); longest first, ties by environment
    assert seg.env.tolist() == [1, 0, 0, 1]
    assert seg.batch_sizes.tolist() == [4, 3, 1]
    assert seg.keep_state.tolist() == [0.0, 1.0, 0.0, 0.0]  # env 1's t=0 is an episode start: zero state
    # flat index t * N + n, packed step by packed step
    assert seg.order.tolist() == [0 * 2 + 1, 0 * 2 + 0, 2 * 2 + 0, 3 * 2 + 1, 1 * 2 + 1, 1 * 2 + 0, 3 * 2 + 0,
                                  2 * 2 + 1]
    assert torch.equal(seg.order[seg.inverse], torch.arange(8))
    assert seg.last.tolist() == [2, 3]  # env 0 ends in segment 2 (starting at t=2), env 1 in segment 3


@pytest.mark.parametrize("rnn_type,layers", [("gru", 1), ("gru", 2), ("lstm", 2)])
@pytest.mark.parametrize("reset_prob", [0.05, 0.3, 1.0])
def test_packed_core_equals_step_by_step(rnn_type: str, layers: int, reset_prob: float) -> None:
    """Outputs, final state and every gradient of the packed call equal a single-step loop that zeroes the state
    at each episode start."""
    gen = torch.Generator().manual_seed(layers * 10 + int(reset_prob * 100))
    obs_spaces = spaces(None)
    policy = small_policy(obs_spaces, rnn_type=rnn_type, num_recurrent_layers=layers).double()
    t_len, n, d = 12, 5, policy.core.input_size
    masks = torch.rand(t_len, n, generator=gen) > reset_prob
    x = torch.randn(t_len, n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    hidden0 = torch.randn(policy.num_hidden_layers, n, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    out, hidden = policy._run_core(x, masks, hidden0)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum() + hidden.sum(), [x, hidden0, *policy.core.parameters()])

    h, ref = hidden0, []
    for t in range(t_len):
        o, h = policy._rnn(x[t : t + 1], h * masks[t].double().view(1, -1, 1))
        ref.append(o[0])
    ref_out = torch.stack(ref)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + h.sum(), [x, hidden0, *policy.core.parameters()])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(hidden, h)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
