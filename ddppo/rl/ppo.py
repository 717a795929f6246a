"""PPO as pure functions: generalised advantage estimation and the clipped PPO loss.

Nothing here holds state; every function maps tensors to tensors so it can be tested alone (the style of
torchrl's functional losses). The loss follows habitat-baselines' PPO (clipped surrogate, clipped value
loss, entropy bonus, no advantage normalisation by default) and adds ``reduction="sum"`` so that DD-PPO ranks
that collected different numbers of samples (a preempted rollout is shorter) can be weighted by their sample
counts: each rank returns sums, the caller divides by the all-reduced global sample count, and the all-reduced
gradient is then exactly the gradient of the mean loss over the concatenated global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ddppo.config import PPOConfig, ValueClip

__all__ = ["gae", "bootstrap_truncated", "normalized_advantages", "ppo_loss", "make_adam", "Reduction"]

Reduction = Literal["mean", "sum"]


def gae(
    rewards: Tensor,
    values: Tensor,
    not_done: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over a rollout of ``T`` steps and ``N`` envs.

    With ``delta_t = r_t + gamma * not_done_t * V_{t+1} - V_t``::

        A_t = delta_t + gamma * lam * not_done_t * A_{t+1},     A_T = 0
        R_t = A_t + V_t

    Args:
        rewards: ``[T, N]`` reward received for the action taken at step ``t``.
        values: ``[T + 1, N]`` value estimates. ``values[t]`` is ``V(s_t)`` for the observation the action
            at step ``t`` was taken from; ``values[T]`` is the bootstrap value of the state reached after the
            last step. It is used whenever ``not_done[T - 1] == 1``; that is how a rollout cut short by the
            end of the rollout, or by DD-PPO preemption, is bootstrapped.
        not_done: ``[T, N]``; 0 if the episode ended at step ``t`` (so ``values[t + 1]``, which belongs to the
            next episode after an auto-reset, is not used), 1 otherwise. Bool or float.
        gamma: discount factor.
        lam: GAE lambda (habitat calls it ``tau``). ``lam=1`` gives discounted Monte-Carlo returns plus the
            bootstrap; ``lam=0`` gives the TD(0) target ``r_t + gamma * V_{t+1}``.

    Returns:
        ``(advantages, returns)``, both ``[T, N]`` with the dtype of ``values``.

    Time-limit truncation: an episode cut by a time limit did not *terminate*, so its last step should still
    be bootstrapped from ``V(final observation)``. With auto-resetting environments ``values[t + 1]`` is the
    value of the *next* episode's first observation, so the caller must instead add
    ``gamma * V(final observation)`` to that step's reward and mark the step done (``not_done[t] = 0``), as
    stable-baselines3 does; see :func:`bootstrap_truncated`.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [T, N], got shape {tuple(rewards.shape)}")
    num_steps, num_envs = rewards.shape
    if tuple(values.shape) != (num_steps + 1, num_envs):
        raise ValueError(
            f"values must be [T + 1, N] = {(num_steps + 1, num_envs)}, got shape {tuple(values.shape)}"
        )
    if tuple(not_done.shape) != (num_steps, num_envs):
        raise ValueError(
            f"not_done must be [T, N] = {(num_steps, num_envs)}, got shape {tuple(not_done.shape)}"
        )

    not_done = not_done.to(values.dtype)
    rewards = rewards.to(values.dtype)
    advantages = torch.zeros_like(values[:num_steps])
    # the same loop in numpy on the CPU (the same float operations in the same order, so the same bits): a step is
    # ~10 small operations, each dominated by torch's dispatch on a small CPU and an order of magnitude cheaper in
    # numpy
    on_cpu = values.device.type == "cpu" and not values.requires_grad and values.dtype != torch.bfloat16
    r, v, d, a = (x.numpy() for x in (rewards, values, not_done, advantages)) if on_cpu else (
        rewards, values, not_done, advantages)
    last = (np.zeros_like if on_cpu else torch.zeros_like)(v[0])
    for t in reversed(range(num_steps)):
        delta = r[t] + gamma * d[t] * v[t + 1] - v[t]
        last = delta + gamma * lam * d[t] * last
        a[t] = last
    returns = advantages + values[:num_steps]
    return advantages, returns


def bootstrap_truncated(rewards_t: Tensor, truncated: Tensor, final_values: Tensor, gamma: float) -> Tensor:
    """Fold the bootstrap of a time-limit truncation into the reward of that step.

    Returns ``rewards_t + gamma * final_values`` where ``truncated`` is true and ``rewards_t`` elsewhere. The
    caller must also mark the truncated step as done (``not_done = 0``) so that :func:`gae` does not bootstrap
    from ``values[t + 1]``, which after an auto-reset is the value of the next episode's first observation.

    Args:
        rewards_t: ``[N]`` rewards of one step.
        truncated: ``[N]`` bool, true where the episode was cut by a time limit (not terminated) at this step.
        final_values: ``[N]`` ``V(final observation)`` of the truncated episodes (any value where not
            truncated; it is ignored there, even if it is NaN).
        gamma: discount factor.

    Returns:
        ``[N]`` new rewards (a new tensor; the input is not modified).
    """
    if truncated.dtype != torch.bool:
        raise TypeError(f"truncated must be a bool tensor, got {truncated.dtype}")
    bonus = gamma * final_values.to(rewards_t.dtype).reshape(rewards_t.shape)
    return torch.where(truncated.reshape(rewards_t.shape), rewards_t + bonus, rewards_t)


def normalized_advantages(
    advantages: Tensor,
    sum_over_ranks: Callable[[Sequence[float]], Tensor] | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``(A - mean) / sqrt(var + eps)`` with the mean and unbiased variance of every finite advantage: the
    normalisation of habitat-baselines' PPO (``get_advantages``: ``torch.var_mean``, ``rsqrt(var + 1e-5)``), over
    a whole rollout rather than per minibatch.

    With ``sum_over_ranks`` (a function that sums a list of numbers over the DD-PPO ranks, e.g.
    ``lambda v: ddppo.distributed.all_reduce_sum(v, info)``) the statistics are those of every rank's advantages
    together, computed in float64 in two passes (count and sum, then squared deviations): the result equals one
    process normalising the concatenation of all ranks' rollouts, whatever share each rank collected. Non-finite
    advantages stay non-finite (the caller's NaN check sees them) and do not enter the statistics.
    """
    total = sum_over_ranks or (lambda values: torch.as_tensor(values, dtype=torch.float64))
    a = advantages.detach()
    finite = a[torch.isfinite(a)].double()
    count, summed = total([float(finite.numel()), finite.sum().item()]).tolist()
    mean = summed / max(count, 1.0)
    squared = total([(finite - mean).pow(2).sum().item()])[0].item()
    var = squared / (count - 1) if count > 1 else math.nan  # torch.var_mean's unbiased estimate
    return ((a.double() - mean) / math.sqrt(var + eps)).to(a.dtype)


def _reduce(x: Tensor, weight: Tensor | None, reduction: Reduction) -> Tensor:
    if weight is not None:
        x = x * weight
    total = x.sum()
    if reduction == "sum":
        return total
    denom = weight.sum() if weight is not None else x.new_tensor(float(x.numel()))
    return total / denom


def ppo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    entropy: Tensor,
    ppo: PPOConfig,
    *,
    normalize_advantages: bool = False,
    reduction: Reduction = "mean",
    sample_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO loss as in habitat-baselines (one term per sample, then reduced).

    Per sample, with ``ratio = exp(log_probs - old_log_probs)``::

        policy_loss = -min(ratio * A, clamp(ratio, 1 - clip, 1 + clip) * A)
        value_loss  = 0.5 * max((V - R)^2, (old_V + clamp(V - old_V, -clip, clip) - R)^2)   # clipped, "max"
        value_loss  = 0.5 * (V' - R)^2,  V' = V where |V - old_V| < clip                 # clipped, "where"
                                          else old_V + clamp(V - old_V, -clip, clip) (no gradient there)
        value_loss  = 0.5 * (V - R)^2                                                     # unclipped
        total       = value_coef * value_loss + policy_loss - entropy_coef * entropy

    All inputs are per-sample tensors of the same shape (any shape, e.g. ``[B]`` or ``[T, N]``; a value head's
    trailing ``1`` must be squeezed by the caller, a mismatch raises instead of silently broadcasting).

    Args:
        log_probs: log pi(a|s) under the current policy (differentiable).
        old_log_probs: log pi_old(a|s) recorded during the rollout.
        advantages: advantage estimates (e.g. from :func:`gae`).
        values: current value predictions (differentiable).
        old_values: value predictions recorded during the rollout.
        returns: value targets (e.g. from :func:`gae`).
        entropy: per-sample policy entropy (differentiable).
        ppo: the config's ``ppo`` section (or a PPOConfig); the loss reads its slice: ``clip`` (PPO's clip range
            epsilon, also used for the value clip), ``value_coef`` and ``entropy_coef`` (the weights of the value
            loss and the entropy bonus), ``clipped_value_loss`` (habitat's ``use_clipped_value_loss``) and
            ``value_clip``, its form: ``max``, the pessimistic maximum of PPO's original implementation, or
            ``where``, habitat-baselines' current one (the clipped prediction replaces V where V moved more than
            ``clip`` from ``old_V``, and those samples give the value head no gradient).
        normalize_advantages: normalise advantages to zero mean, unit std (weighted by ``sample_weight``)
            over this call's samples. Off by default, as in DD-PPO. The trainer does not use it: it normalises a
            whole rollout over every rank first (:func:`normalized_advantages`); this normalises one call's.
        reduction: ``"mean"`` (default) returns (weighted) means over samples. ``"sum"`` returns (weighted)
            SUMS over samples, for the loss and every diagnostic, so a distributed caller can divide
            everything by the all-reduced global sample count: each rank is then weighted by its number of
            samples, and ``sum_r sum_loss_r / sum_r n_r`` equals the mean loss over the concatenated batch.
        sample_weight: optional per-sample weights (same shape), e.g. a 0/1 validity mask. With ``"mean"`` the
            reduction is ``sum(w * x) / sum(w)``; with ``"sum"`` it is ``sum(w * x)``.

    Returns:
        ``(total_loss, info)``: ``total_loss`` is a scalar; ``info`` holds detached scalars ``policy_loss``,
        ``value_loss``, ``entropy``, ``approx_kl`` (the low-variance estimator ``(ratio - 1) - log(ratio)`` of
        KL(old || new)) and ``clip_fraction`` (fraction of samples with ``|ratio - 1| > clip``), all reduced
        with the same ``reduction`` and weights as the loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    _check_same_shape(log_probs, old_log_probs=old_log_probs, advantages=advantages, values=values,
                      old_values=old_values, returns=returns, entropy=entropy, sample_weight=sample_weight)
    weight = sample_weight.to(log_probs.dtype) if sample_weight is not None else None

    advantages = advantages.detach()
    if normalize_advantages:
        w = weight if weight is not None else torch.ones_like(advantages)
        mean = (w * advantages).sum() / w.sum()
        var = (w * (advantages - mean) ** 2).sum() / w.sum()
        advantages = (advantages - mean) / (var.sqrt() + 1e-5)

    log_ratio = log_probs - old_log_probs.detach()
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    clip = ppo.clip
    surr2 = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    policy_terms = -torch.min(surr1, surr2)

    value_terms = _value_terms(values, old_values, returns.detach(), clip, ppo.clipped_value_loss, ppo.value_clip)
    policy_loss = _reduce(policy_terms, weight, reduction)
    value_loss = _reduce(value_terms, weight, reduction)
    entropy_term = _reduce(entropy, weight, reduction)
    total = ppo.value_coef * value_loss + policy_loss - ppo.entropy_coef * entropy_term

    with torch.no_grad():
        log_ratio_d = log_ratio.detach()
        approx_kl = _reduce(torch.expm1(log_ratio_d) - log_ratio_d, weight, reduction)
        clipped = ((ratio.detach() - 1.0).abs() > clip).to(log_probs.dtype)
        clip_fraction = _reduce(clipped, weight, reduction)

    info = {
        "policy_loss": policy_loss.detach(),
        "value_loss": value_loss.detach(),
        "entropy": entropy_term.detach(),
        "approx_kl": approx_kl,
        "clip_fraction": clip_fraction,
    }
    return total, info


def _check_same_shape(log_probs: Tensor, **named: Tensor | None) -> None:
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != log_probs.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but log_probs has shape {tuple(log_probs.shape)}; "
                "all per-sample inputs must have the same shape"
            )


def _value_terms(values: Tensor, old_values: Tensor, returns: Tensor, clip: float, clipped: bool,
                 value_clip: ValueClip) -> Tensor:
    """Per-sample value loss, in the form ``ppo_loss`` documents."""
    if clipped and value_clip == ValueClip.max:
        old_values = old_values.detach()
        values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        return 0.5 * torch.max((values - returns).pow(2), (values_clipped - returns).pow(2))
    if clipped:
        old_values = old_values.detach()
        moved = values.detach() - old_values
        kept = torch.where(moved.abs() < clip, values, old_values + moved.clamp(-clip, clip))
        return 0.5 * (kept - returns).pow(2)
    return 0.5 * (values - returns).pow(2)


def make_adam(params, lr: float, eps: float) -> torch.optim.Adam:
    """The trainer's optimiser: Adam, fused where this torch has a fused kernel for the parameters' device (one
    kernel for all parameters instead of ~10 ops each); the plain implementation elsewhere (torch < 2.4 on CPU)."""
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, eps=eps)
