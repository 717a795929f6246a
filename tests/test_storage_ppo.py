"""Tests for ddppo.rl.ppo (GAE, truncation bootstrap, PPO loss) and ddppo.rl.storage.RolloutStorage."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import pytest
import torch

from ddppo.config import PPOConfig, ValueClip
from ddppo.rl.episode_stats import EpisodeStats
from ddppo.rl.ppo import bootstrap_truncated, gae, make_adam, normalized_advantages, ppo_loss
from ddppo.rl.storage import RolloutStorage

GAMMA, LAM = 0.9, 0.8  # gamma * lam = 0.72


def col(values: list[float]) -> torch.Tensor:
    """A [T, 1] float64 column."""
    return torch.tensor(values, dtype=torch.float64).unsqueeze(1)


def assert_close(actual: torch.Tensor, expected: list[float] | float) -> None:
    torch.testing.assert_close(
        actual.to(torch.float64).flatten(),
        torch.tensor(expected, dtype=torch.float64).flatten(),
        rtol=0,
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------------- GAE
# T = 3, N = 1, gamma = 0.9, lam = 0.8, rewards r = [1, 2, 3], values V = [0.5, 1.0, 1.5, 2.0]
# (V[3] = bootstrap).
REWARDS = [1.0, 2.0, 3.0]
VALUES = [0.5, 1.0, 1.5, 2.0]


def test_gae_no_episode_end_hand_computed() -> None:
    # delta_2 = 3 + 0.9 * 2.0 - 1.5 = 3.3
    # delta_1 = 2 + 0.9 * 1.5 - 1.0 = 2.35
    # delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4
    # A_2 = 3.3
    # A_1 = 2.35 + 0.72 * 3.3   = 2.35 + 2.376   = 4.726
    # A_0 = 1.4  + 0.72 * 4.726 = 1.4  + 3.40272 = 4.80272
    # R = A + V[:3] = [5.30272, 5.726, 4.8]
    adv, ret = gae(col(REWARDS), col(VALUES), col([1.0, 1.0, 1.0]), GAMMA, LAM)
    assert adv.shape == ret.shape == (3, 1)
    assert_close(adv, [4.80272, 4.726, 3.3])
    assert_close(ret, [5.30272, 5.726, 4.8])


def test_gae_episode_end_in_the_middle_hand_computed() -> None:
    # Episode ends at t = 1 (not_done = [1, 0, 1]): V[2] belongs to the next episode and is not used at t = 1,
    # and the advantage does not flow back across the boundary.
    # delta_2 = 3 + 0.9 * 2.0 - 1.5 = 3.3           A_2 = 3.3
    # delta_1 = 2 + 0             - 1.0 = 1.0       A_1 = 1.0
    # delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4           A_0 = 1.4 + 0.72 * 1.0 = 2.12
    # R = [2.62, 2.0, 4.8]
    adv, ret = gae(col(REWARDS), col(VALUES), col([1.0, 0.0, 1.0]), GAMMA, LAM)
    assert_close(adv, [2.12, 1.0, 3.3])
    assert_close(ret, [2.62, 2.0, 4.8])
    # bool not_done is accepted too
    adv_b, _ = gae(col(REWARDS), col(VALUES), torch.tensor([[True], [False], [True]]), GAMMA, LAM)
    assert_close(adv_b, [2.12, 1.0, 3.3])


def test_gae_lambda_one_is_discounted_monte_carlo_plus_bootstrap() -> None:
    # R_2 = 3 + 0.9 * 2.0  = 4.8
    # R_1 = 2 + 0.9 * 4.8  = 6.32
    # R_0 = 1 + 0.9 * 6.32 = 6.688
    _, ret = gae(col(REWARDS), col(VALUES), col([1.0, 1.0, 1.0]), GAMMA, 1.0)
    assert_close(ret, [6.688, 6.32, 4.8])
    # with an episode end at t = 1 the bootstrap stops there: R_1 = 2, R_0 = 1 + 0.9 * 2 = 2.8
    _, ret = gae(col(REWARDS), col(VALUES), col([1.0, 0.0, 1.0]), GAMMA, 1.0)
    assert_close(ret, [2.8, 2.0, 4.8])


def test_gae_lambda_zero_is_td0_target() -> None:
    # R_t = r_t + 0.9 * V_{t+1}: [1 + 0.9, 2 + 1.35, 3 + 1.8] = [1.9, 3.35, 4.8]
    adv, ret = gae(col(REWARDS), col(VALUES), col([1.0, 1.0, 1.0]), GAMMA, 0.0)
    assert_close(ret, [1.9, 3.35, 4.8])
    assert_close(adv, [1.4, 2.35, 3.3])


def test_gae_envs_are_independent_and_shapes_checked() -> None:
    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.5, 0.0], [2.0, 0.0]], dtype=torch.float64)
    not_done = torch.ones(3, 2, dtype=torch.float64)
    adv, _ = gae(rewards, values, not_done, GAMMA, LAM)
    assert_close(adv[:, 0], [4.80272, 4.726, 3.3])
    # env 1: only the last reward 1 -> A = [0.72^2, 0.72, 1] = [0.5184, 0.72, 1.0]
    assert_close(adv[:, 1], [0.5184, 0.72, 1.0])
    with pytest.raises(ValueError, match="values"):
        gae(rewards, values[:3], not_done, GAMMA, LAM)


# ------------------------------------------------------------------------------------------ truncation
def test_bootstrap_truncated_adds_discounted_final_value_only_where_truncated() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0])
    truncated = torch.tensor([True, False, True])
    final_values = torch.tensor([10.0, float("nan"), -1.0])  # NaN where not truncated must be ignored
    out = bootstrap_truncated(rewards, truncated, final_values, 0.9)
    assert_close(out, [1.0 + 9.0, 2.0, 3.0 - 0.9])
    assert_close(rewards, [1.0, 2.0, 3.0])  # input untouched
    with pytest.raises(TypeError):
        bootstrap_truncated(rewards, truncated.float(), final_values, 0.9)


def test_time_limit_truncation_bootstraps_from_final_obs_not_next_episode() -> None:
    # Episode is cut by a time limit at t = 1; V(final observation of that episode) = 4.0. After the
    # auto-reset, V[2] = 100 is the value of the NEXT episode's first observation and must not leak into
    # t <= 1.
    # r_1' = 2 + 0.9 * 4.0 = 5.6, not_done = [1, 0, 1]
    # delta_1 = 5.6 - 1.0 = 4.6                     A_1 = 4.6
    # delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4           A_0 = 1.4 + 0.72 * 4.6 = 4.712
    # R_0 = 5.212, R_1 = 5.6
    rewards = col(REWARDS)
    rewards[1] = bootstrap_truncated(
        rewards[1], torch.tensor([True]), torch.tensor([4.0], dtype=torch.float64), 0.9
    )
    assert_close(rewards[1], 5.6)
    not_done = col([1.0, 0.0, 1.0])
    for next_episode_value in (100.0, -7.0):
        values = col([0.5, 1.0, next_episode_value, 2.0])
        adv, ret = gae(rewards, values, not_done, GAMMA, LAM)
        assert_close(adv[:2], [4.712, 4.6])
        assert_close(ret[:2], [5.212, 5.6])


# ---------------------------------------------------------------------------------------------- PPO loss
# Three samples, clip = 0.2:
#   ratio    A    surr1 = ratio * A    surr2 = clamp(ratio, 0.8, 1.2) * A    min
#    1.1     2         2.2                     2.2                           2.2   (inside the clip range)
#    1.5     1         1.5                     1.2                           1.2   (clipped above)
#    0.5    -1        -0.5                    -0.8                          -0.8   (clipped below, A < 0)
#   policy_loss = -(2.2 + 1.2 - 0.8) / 3 = -2.6 / 3 = -0.8666667;  clip_fraction = 2 / 3
#
#   old_V   V     R    (V - R)^2   V_clipped = old_V + clamp(V - old_V, -0.2, 0.2)   (V_clipped - R)^2   max
#    1.0   1.1   2.0     0.81          1.1                                               0.81           0.81
#    1.0   1.5   2.0     0.25          1.2                                               0.64           0.64
#    1.0   0.5   2.0     2.25          0.8                                               1.44           2.25
#   clipped value loss   = 0.5 * (0.81 + 0.64 + 2.25) / 3 = 1.85 / 3 = 0.6166667
#   unclipped value loss = 0.5 * (0.81 + 0.25 + 2.25) / 3 = 1.655 / 3 = 0.5516667
#   entropy = (1.0 + 1.2 + 1.4) / 3 = 1.2
#   total (value_coef 0.5, entropy_coef 0.01) = 0.5 * 0.6166667 - 0.8666667 - 0.012 = -0.5703333   (clipped)
#                                             = 0.5 * 0.5516667 - 0.8666667 - 0.012 = -0.6028333   (unclipped)
#   approx_kl = mean((r - 1) - log r) = (0.1 - log 1.1 + 0.5 - log 1.5 - 0.5 - log 0.5) / 3
RATIOS = [1.1, 1.5, 0.5]
OLD_LOG_PROBS = [-1.0, -2.0, -0.5]


def ppo_inputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    log_probs = t([o + math.log(r) for o, r in zip(OLD_LOG_PROBS, RATIOS)])
    values = t([1.1, 1.5, 0.5])
    entropy = t([1.0, 1.2, 1.4])
    if requires_grad:
        for x in (log_probs, values, entropy):
            x.requires_grad_(True)
    return {
        "log_probs": log_probs,
        "old_log_probs": t(OLD_LOG_PROBS),
        "advantages": t([2.0, 1.0, -1.0]),
        "values": values,
        "old_values": t([1.0, 1.0, 1.0]),
        "returns": t([2.0, 2.0, 2.0]),
        "entropy": entropy,
    }


PPO = PPOConfig(clip=0.2, value_coef=0.5, entropy_coef=0.01)


def test_ppo_loss_hand_computed_clipped_value_loss() -> None:
    total, info = ppo_loss(**ppo_inputs(), ppo=PPO)
    assert total.dim() == 0
    assert_close(info["policy_loss"], -2.6 / 3)
    assert_close(info["value_loss"], 1.85 / 3)
    assert_close(info["entropy"], 1.2)
    assert_close(info["clip_fraction"], 2 / 3)
    kl = (0.1 - math.log(1.1) + 0.5 - math.log(1.5) - 0.5 - math.log(0.5)) / 3
    assert_close(info["approx_kl"], kl)
    assert_close(total, -0.5703333333)


def test_ppo_loss_hand_computed_unclipped_value_loss() -> None:
    total, info = ppo_loss(**ppo_inputs(), ppo=replace(PPO, clipped_value_loss=False))
    assert_close(info["value_loss"], 1.655 / 3)
    assert_close(total, -0.6028333333)


def test_ppo_loss_hand_computed_where_value_clip() -> None:
    """habitat-baselines' form: V' = V where |V - old_V| < clip, else old_V + clamp(V - old_V): samples 2 and 3
    moved 0.5 > 0.2, so V' = 1.2 and 0.8: 0.5 * (0.81 + 0.64 + 1.44) / 3, and only sample 1 has a gradient."""
    inputs = ppo_inputs(requires_grad=True)
    total, info = ppo_loss(**inputs, ppo=replace(PPO, value_clip=ValueClip.where))
    assert_close(info["value_loss"], 2.89 / 6)
    total.backward()
    assert_close(inputs["values"].grad, [0.5 * 0.5 * 2 * (1.1 - 2.0) / 3, 0.0, 0.0])  # value_coef * d/dV


def test_ppo_loss_gradients_zero_where_clipped() -> None:
    inputs = ppo_inputs(requires_grad=True)
    total, _ = ppo_loss(**inputs, ppo=PPO)
    total.backward()
    g = inputs["log_probs"].grad
    # d(-ratio * A / 3)/d log_prob = -ratio * A / 3 where unclipped; 0 where the clipped term is the min.
    assert_close(g, [-1.1 * 2.0 / 3, 0.0, 0.0])
    # entropy gradient = -entropy_coef / 3 per sample
    assert_close(inputs["entropy"].grad, [-0.01 / 3] * 3)


def test_ppo_loss_normalize_advantages_option() -> None:
    inputs = ppo_inputs()
    adv = inputs["advantages"]
    norm = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-5)
    _, info = ppo_loss(**inputs, ppo=PPO, normalize_advantages=True)
    _, ref = ppo_loss(**{**inputs, "advantages": norm}, ppo=PPO)
    assert_close(info["policy_loss"], ref["policy_loss"].item())


def test_normalized_advantages_hand_computed_and_nan_left_out() -> None:
    # A = [1, 2, 3, 6]: mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14 / 3
    adv = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    out = normalized_advantages(adv)
    assert_close(out, [(a - 3.0) / math.sqrt(14 / 3 + 1e-5) for a in (1.0, 2.0, 3.0, 6.0)])
    # a NaN stays NaN (the update's own check skips it) and does not enter the statistics
    with_nan = torch.tensor([1.0, 2.0, math.nan, 3.0, 6.0])
    out = normalized_advantages(with_nan)
    assert math.isnan(out[2].item())
    assert_close(out[[0, 1, 3, 4]], [(a - 3.0) / math.sqrt(14 / 3 + 1e-5) for a in (1.0, 2.0, 3.0, 6.0)])


def test_ppo_loss_rejects_shape_mismatch_and_bad_reduction() -> None:
    inputs = ppo_inputs()
    with pytest.raises(ValueError, match="values"):
        ppo_loss(**{**inputs, "values": inputs["values"].unsqueeze(-1)}, ppo=PPO)
    with pytest.raises(ValueError, match="reduction"):
        ppo_loss(**inputs, ppo=PPO, reduction="max")  # type: ignore[arg-type]


def test_ppo_loss_sum_reduction_is_mean_times_count() -> None:
    inputs = ppo_inputs()
    total_mean, info_mean = ppo_loss(**inputs, ppo=PPO)
    total_sum, info_sum = ppo_loss(**inputs, ppo=PPO, reduction="sum")
    assert_close(total_sum, 3 * total_mean.item())
    for key in info_mean:
        assert_close(info_sum[key], 3 * info_mean[key].item())


def _random_batch(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    r = lambda: torch.randn(n, generator=gen, dtype=torch.float64)  # noqa: E731
    old = r()
    values_old = r()
    return {
        "log_probs": old + 0.3 * r(),
        "old_log_probs": old,
        "advantages": r(),
        "values": values_old + 0.3 * r(),
        "old_values": values_old,
        "returns": r(),
        "entropy": r().abs(),
    }


def _leaf(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in batch.items()}
    for k in ("log_probs", "values", "entropy"):
        out[k].requires_grad_(True)
    return out


def test_sum_over_splits_divided_by_global_count_equals_concatenated_loss_and_gradients() -> None:
    """The DD-PPO property: ranks with different sample counts, each returning sums, divided by the
    all-reduced count, give exactly the loss (and gradient) of the concatenated batch."""
    gen = torch.Generator().manual_seed(0)
    full = _random_batch(10, gen)
    n_a = 3  # e.g. a preempted rank with few samples and a full one with 7
    leaf = _leaf(full)
    total_full, info_full = ppo_loss(**leaf, ppo=PPO)
    total_full.backward()

    split_leaves = [
        _leaf({k: v[:n_a] for k, v in full.items()}),
        _leaf({k: v[n_a:] for k, v in full.items()}),
    ]
    global_count = 10
    summed_total = torch.zeros((), dtype=torch.float64)
    summed_info = {k: torch.zeros((), dtype=torch.float64) for k in info_full}
    for part in split_leaves:
        total, info = ppo_loss(**part, ppo=PPO, reduction="sum")
        (total / global_count).backward()
        summed_total += total.detach()
        for k in info:
            summed_info[k] += info[k]
    assert_close(summed_total / global_count, total_full.item())
    for k in info_full:
        assert_close(summed_info[k] / global_count, info_full[k].item())
    for name in ("log_probs", "values", "entropy"):
        grads = torch.cat([part[name].grad for part in split_leaves])
        torch.testing.assert_close(grads, leaf[name].grad)

    # Equivalently: per-rank means weighted by per-rank sample counts.
    mean_a, _ = ppo_loss(**{k: v[:n_a] for k, v in full.items()}, ppo=PPO)
    mean_b, _ = ppo_loss(**{k: v[n_a:] for k, v in full.items()}, ppo=PPO)
    assert_close((n_a * mean_a + (10 - n_a) * mean_b) / 10, total_full.item())


def test_sample_weighted_sums_over_splits_equal_weighted_loss_over_concatenation() -> None:
    gen = torch.Generator().manual_seed(1)
    full = _random_batch(8, gen)
    weight = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0, 0.0, 3.0], dtype=torch.float64)
    total_full, _ = ppo_loss(**full, ppo=PPO, sample_weight=weight)
    parts = [slice(0, 5), slice(5, 8)]
    summed = sum(
        ppo_loss(**{k: v[s] for k, v in full.items()}, ppo=PPO, reduction="sum", sample_weight=weight[s])[0]
        for s in parts
    )
    assert_close(summed / weight.sum(), total_full.item())

    # 0/1 weights act as a validity mask: equal to the loss over the valid samples alone.
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    masked, _ = ppo_loss(**full, ppo=PPO, sample_weight=mask.double())
    valid, _ = ppo_loss(**{k: v[mask] for k, v in full.items()}, ppo=PPO)
    assert_close(masked, valid.item())


# ------------------------------------------------------------------------------------------- storage
OBS_SPACES = {
    "depth": ((2, 2, 1), torch.float32),
    "rgb": ((2, 2, 3), torch.uint8),
    "goal": ((3,), torch.float32),
}
HIDDEN = (2, 4)


def make_storage(num_steps: int = 5, num_envs: int = 3) -> RolloutStorage:
    return RolloutStorage(num_steps, num_envs, OBS_SPACES, HIDDEN, device="cpu")


def random_step(n: int, gen: torch.Generator) -> dict:
    obs = {
        "depth": torch.rand(n, 2, 2, 1, generator=gen),
        "rgb": torch.randint(0, 256, (n, 2, 2, 3), generator=gen, dtype=torch.uint8),
        "goal": torch.randn(n, 3, generator=gen),
    }
    done = torch.rand(n, generator=gen) < 0.3
    return {
        "obs": obs,
        "hidden": torch.randn(HIDDEN[0], n, HIDDEN[1], generator=gen),
        "actions": torch.randint(0, 4, (n,), generator=gen),
        "log_probs": -torch.rand(n, generator=gen),
        "values": torch.randn(n, generator=gen),
        "rewards": torch.randn(n, generator=gen),
        "not_done": (~done).float(),
        "masks": (~done).float(),
    }


def fill(storage: RolloutStorage, steps: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    first = random_step(storage.num_envs, gen)
    storage.set_first_observation(first["obs"], first["hidden"])
    records = []
    for _ in range(steps):
        rec = random_step(storage.num_envs, gen)
        storage.insert(**rec)
        records.append(rec)
    return records


def test_storage_shapes_and_dtypes() -> None:
    s = make_storage(5, 3)
    assert s.obs["depth"].shape == (6, 3, 2, 2, 1) and s.obs["depth"].dtype == torch.float32
    assert s.obs["rgb"].shape == (6, 3, 2, 2, 3) and s.obs["rgb"].dtype == torch.uint8
    assert s.hidden.shape == (6, 2, 3, 4)
    assert s.prev_actions.shape == (6, 3) and s.prev_actions.dtype == torch.long
    assert s.masks.shape == (6, 3) and s.values.shape == (6, 3)
    assert s.actions.shape == (5, 3) and s.actions.dtype == torch.long
    for name in ("log_probs", "rewards", "not_done", "advantages", "returns"):
        assert getattr(s, name).shape == (5, 3)
    assert s.step == 0 and s.num_samples == 0


def test_insert_writes_step_and_next_observation() -> None:
    s = make_storage(5, 3)
    recs = fill(s, 2)
    assert s.step == 2 and s.num_samples == 6
    for t, rec in enumerate(recs):
        torch.testing.assert_close(s.actions[t], rec["actions"])
        torch.testing.assert_close(s.prev_actions[t + 1], rec["actions"])
        torch.testing.assert_close(s.log_probs[t], rec["log_probs"])
        torch.testing.assert_close(s.values[t], rec["values"])
        torch.testing.assert_close(s.rewards[t], rec["rewards"])
        torch.testing.assert_close(s.not_done[t], rec["not_done"])
        torch.testing.assert_close(s.masks[t + 1], rec["masks"])
        torch.testing.assert_close(s.hidden[t + 1], rec["hidden"])
        for k in OBS_SPACES:
            torch.testing.assert_close(s.obs[k][t + 1], rec["obs"][k])
    assert s.masks[0].eq(0).all() and s.prev_actions[0].eq(0).all()
    s2 = make_storage(2, 3)
    fill(s2, 2)
    with pytest.raises(RuntimeError, match="full"):
        s2.insert(**random_step(3, torch.Generator().manual_seed(9)))


def test_compute_returns_matches_gae_on_full_rollout() -> None:
    s = make_storage(5, 3)
    fill(s, 5)
    next_value = torch.tensor([0.3, -0.2, 1.0])
    s.compute_returns(next_value, 0.99, 0.95)
    values = torch.cat([s.values[:5], next_value[None]])
    adv, ret = gae(s.rewards, values, s.not_done, 0.99, 0.95)
    torch.testing.assert_close(s.advantages, adv)
    torch.testing.assert_close(s.returns, ret)
    torch.testing.assert_close(s.values[5], next_value)


def test_preempted_rollout_ignores_unfilled_steps() -> None:
    s = make_storage(5, 3)
    fill(s, 3)
    # Poison everything past the 3 valid steps: none of it may leak into returns or minibatches.
    s.rewards[3:] = 1e6
    s.not_done[3:] = 1.0
    s.values[4:] = 1e6
    s.log_probs[3:] = 1e6
    next_value = torch.tensor([0.5, 0.0, -0.5])
    s.compute_returns(next_value, GAMMA, LAM)
    adv, ret = gae(s.rewards[:3], torch.cat([s.values[:3], next_value[None]]), s.not_done[:3], GAMMA, LAM)
    torch.testing.assert_close(s.advantages[:3], adv)
    torch.testing.assert_close(s.returns[:3], ret)
    assert s.advantages[3:].eq(0).all() and s.returns[3:].eq(0).all()
    assert s.num_samples == 9

    # The same steps in a storage of exactly 3 steps give the same result.
    short = make_storage(3, 3)
    fill(short, 3)
    short.compute_returns(next_value, GAMMA, LAM)
    torch.testing.assert_close(short.advantages, s.advantages[:3])

    batches = list(s.minibatches(1))
    assert len(batches) == 1
    b = batches[0]
    assert b.actions.shape == (3, 3) and b.obs["depth"].shape == (3, 3, 2, 2, 1)
    assert b.num_samples == 9
    assert b.old_log_probs.abs().max() < 1e6 and b.returns.abs().max() < 1e5


def test_after_update_copies_last_entry_of_preempted_rollout() -> None:
    s = make_storage(5, 3)
    fill(s, 3)
    last = {k: v[3].clone() for k, v in s.obs.items()}
    hidden, prev, masks = s.hidden[3].clone(), s.prev_actions[3].clone(), s.masks[3].clone()
    s.after_update()
    assert s.step == 0 and s.num_samples == 0
    for k in OBS_SPACES:
        torch.testing.assert_close(s.obs[k][0], last[k])
    torch.testing.assert_close(s.hidden[0], hidden)
    torch.testing.assert_close(s.prev_actions[0], prev)
    torch.testing.assert_close(s.masks[0], masks)


@pytest.mark.parametrize("filled", [0, 3])
def test_state_dict_holds_the_live_rows_and_a_loaded_storage_continues_identically(filled: int) -> None:
    """A storage saved mid-rollout (or between rollouts, step 0) and loaded into a fresh one gives the same returns
    and minibatches once both take the same further steps; the saved tensors are only the rows holding data."""
    original = make_storage(5, 3)
    fill(original, filled, seed=4)
    state = original.state_dict()
    assert state["step"] == filled and state["obs.depth"].shape[0] == filled + 1
    assert state["hidden"].shape[0] == filled + 1 and state["actions"].shape[0] == filled
    restored = make_storage(5, 3)
    fill(restored, 5, seed=9)  # stale data everywhere: only the loaded rows may matter
    restored.load_state_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(5 - filled):
        original.insert(**random_step(3, gen_a))
        restored.insert(**random_step(3, gen_b))
    for s in (original, restored):
        s.compute_returns(torch.ones(3), 0.99, 0.95)
    for a, b in zip(original.minibatches(2, generator=torch.Generator().manual_seed(1)),
                    restored.minibatches(2, generator=torch.Generator().manual_seed(1)), strict=True):
        for name, x, y in zip(a._fields, a, b, strict=True):
            if isinstance(x, dict):
                for k in x:
                    assert torch.equal(x[k], y[k]), (name, k)
            elif torch.is_tensor(x):
                assert torch.equal(x, y), name
            else:
                assert x == y, name
    with pytest.raises(ValueError, match="hidden"):
        make_storage(5, 3).load_state_dict({**state, "hidden": torch.zeros(filled + 2, 2, 3, 4)})


def test_minibatches_cover_every_env_once_and_keep_sequences_whole() -> None:
    s = make_storage(4, 5)
    fill(s, 4)
    s.compute_returns(torch.zeros(5), 0.99, 0.95)
    batches = list(s.minibatches(2, generator=torch.Generator().manual_seed(3)))
    assert len(batches) == 2
    seen = torch.cat([b.env_indices for b in batches])
    assert sorted(seen.tolist()) == [0, 1, 2, 3, 4]
    assert sorted(b.env_indices.numel() for b in batches) == [2, 3]
    for b in batches:
        idx = b.env_indices
        nb = idx.numel()
        assert b.num_samples == 4 * nb
        assert b.hidden0.shape == (2, nb, 4)
        torch.testing.assert_close(b.hidden0, s.hidden[0][:, idx])
        for k in OBS_SPACES:
            torch.testing.assert_close(b.obs[k], s.obs[k][:4, idx])
        for key, src in (
            ("prev_actions", s.prev_actions[:4]),
            ("masks", s.masks[:4]),
            ("actions", s.actions),
            ("old_log_probs", s.log_probs),
            ("old_values", s.values[:4]),
            ("returns", s.returns),
            ("advantages", s.advantages),
        ):
            assert getattr(b, key).shape == (4, nb)
            torch.testing.assert_close(getattr(b, key), src[:, idx])
    # Same generator seed -> same split; env-level permutation is random otherwise.
    again = list(s.minibatches(2, generator=torch.Generator().manual_seed(3)))
    assert [b.env_indices.tolist() for b in again] == [b.env_indices.tolist() for b in batches]
    assert len(list(s.minibatches(5))) == 5


def test_minibatches_errors() -> None:
    s = make_storage(4, 3)
    fill(s, 4)
    with pytest.raises(RuntimeError, match="compute_returns"):
        next(s.minibatches(1))
    s.compute_returns(torch.zeros(3), 0.99, 0.95)
    with pytest.raises(ValueError, match=r"num_mini_batch \(4\).*num_envs \(3\)"):
        next(s.minibatches(4))


def test_state_dict_round_trip_resumes_exactly() -> None:
    a = make_storage(5, 3)
    fill(a, 3, seed=4)
    a.compute_returns(torch.tensor([0.1, 0.2, 0.3]), 0.99, 0.95)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_storage(5, 3)
    b.load_state_dict(torch.load(buf))
    assert b.step == 3 and b.returns_computed
    for k, v in a.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)
    # Continuing both gives identical storages.
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a.insert(**random_step(3, gen_a))
    b.insert(**random_step(3, gen_b))
    for k, v in a.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)

    with pytest.raises(KeyError):
        b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "hidden"})
    bad = dict(a.state_dict())
    bad["hidden"] = torch.zeros(1)
    with pytest.raises(ValueError, match="hidden"):
        b.load_state_dict(bad)


def test_make_adam_is_fused_and_steps_like_plain_adam() -> None:
    """The trainer's Adam uses torch's fused kernel on CPU (torch >= 2.4) and takes the same steps as the plain
    implementation, up to float rounding."""
    torch.manual_seed(0)
    w_fused = torch.randn(7, 5, requires_grad=True)
    w_plain = w_fused.detach().clone().requires_grad_()
    fused = make_adam([w_fused], lr=1e-2, eps=1e-5)
    plain = torch.optim.Adam([w_plain], lr=1e-2, eps=1e-5)
    assert fused.defaults["fused"] is True
    for _ in range(20):
        g = torch.randn(7, 5)
        for w, opt in ((w_fused, fused), (w_plain, plain)):
            w.grad = g.clone()
            opt.step()
    torch.testing.assert_close(w_fused, w_plain, rtol=1e-5, atol=1e-6)
    assert not torch.equal(w_fused, torch.zeros(7, 5))


def test_cpu_row_writes_through_numpy_match_torch_copies():
    """On the CPU insert() writes rows through numpy views; the same steps copied by torch (the other devices' path,
    forced here) give the same buffers to the bit, [N, 1] arguments and float masks included."""
    fast = make_storage(4, 3)
    slow = make_storage(4, 3)
    slow._host = None
    for storage in (fast, slow):
        gen = torch.Generator().manual_seed(5)
        first = random_step(3, gen)
        storage.set_first_observation(first["obs"], first["hidden"])
        for _ in range(4):
            rec = random_step(3, gen)
            rec["values"] = rec["values"].unsqueeze(-1)  # [N, 1] fits [N]
            storage.insert(**rec)
    for name, value in slow.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(fast.state_dict()[name], value), name
    assert fast.step == slow.step == 4


def test_row_writes_from_a_tensor_that_requires_grad():
    storage = make_storage(2, 3)
    rec = random_step(3, torch.Generator().manual_seed(0))
    rec["values"] = rec["values"].clone().requires_grad_()
    storage.insert(**rec)
    assert torch.equal(storage.values[0], rec["values"].detach())


def test_episode_stats_hand_case():
    """Two environments over four steps: env 0 ends episodes of return 3 and 4, env 1 one of return 2.5 carried
    across a take(); the metrics are summed at the ended steps only."""
    stats = EpisodeStats(2, ("success", "collisions"))
    steps = [  # rewards, done, success, collisions
        ([1.0, 0.5], [False, False], [0.0, 0.0], [0, 1]),
        ([2.0, 1.0], [True, False], [1.0, 0.0], [2, 1]),
        ([4.0, 1.0], [True, True], [0.0, 1.0], [0, 3]),
        ([0.5, 0.5], [False, False], [1.0, 1.0], [7, 7]),
    ]
    sums = []
    for k, (reward, done, success, collisions) in enumerate(steps):
        stats.add(torch.tensor(reward), torch.tensor(done),
                  {"success": torch.tensor(success), "collisions": torch.tensor(collisions)})
        if k == 1:
            sums.append(stats.take())
    sums.append(stats.take())
    assert sums[0] == [1, 3.0, 1.0, 2.0]
    assert sums[1] == [2, 4.0 + 2.5, 1.0, 3.0]
    assert stats.take() == [0, 0.0, 0.0, 0.0]
    assert stats.episode_return.tolist() == [0.5, 0.5]  # the episodes still running
    assert stats.means(sums[1]) == {"episode/reward": 3.25, "episode/success": 0.5, "episode/collisions": 1.5}
    assert stats.means([0, 0.0, 0.0, 0.0]) == {}


def test_episode_stats_state_round_trip_and_bad_shape():
    stats = EpisodeStats(3, ("success",))
    stats.add(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([False, True, False]), {"success": torch.ones(3)})
    stats.add(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([False, False, False]), {"success": torch.ones(3)})
    state = {k: v.clone() for k, v in stats.state_dict().items()}
    other = EpisodeStats(3, ("success",))
    other.load_state_dict(state)
    assert other.take() == stats.take() == [1, 2.0, 1.0]
    assert other.episode_return.tolist() == stats.episode_return.tolist() == [2.0, 1.0, 4.0]
    with pytest.raises(ValueError, match="episode_return has shape"):
        EpisodeStats(4, ("success",)).load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gae_numpy_loop_on_cpu_gives_torchs_bits(dtype):
    """On the CPU gae runs its loop through numpy; values that require grad keep torch's loop. Same operations in
    the same order: the same bits, bool or float not_done, with episode ends and a preemption-style bootstrap."""
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(7, 5, generator=gen, dtype=dtype)
    values = torch.randn(8, 5, generator=gen, dtype=dtype)
    not_done = torch.rand(7, 5, generator=gen) > 0.3
    for nd in (not_done, not_done.float()):
        adv, ret = gae(rewards, values, nd, 0.99, 0.95)
        adv_t, ret_t = gae(rewards, values.clone().requires_grad_(), nd, 0.99, 0.95)
        assert adv.dtype == dtype and torch.equal(adv, adv_t.detach()) and torch.equal(ret, ret_t.detach())
