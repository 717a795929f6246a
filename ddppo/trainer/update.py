"""The DD-PPO update: PPO epochs over a worker's rollout, gradients all-reduced across workers so that the update
equals one over the concatenation of every worker's samples (docs/design.md, "Invariants"), rolled back whole when
a loss or gradient is NaN/Inf on any worker."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

import torch

from ddppo.config import GradWeighting
from ddppo.distributed import DistInfo, all_reduce_sum
from ddppo.rl.flat_grads import FlatGradients
from ddppo.rl.ppo import normalized_advantages, ppo_loss
from ddppo.rl.storage import Minibatch, RolloutStorage

LOSS_TERMS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction")
"""The diagnostics ``ppo_loss`` returns, in :class:`UpdateStats`' order."""


@dataclass(frozen=True)
class UpdateStats:
    """An update's loss terms and gradient norm, each the mean over its minibatches of the value over every worker's
    samples; NaN, and ``skipped``, when a NaN/Inf loss or gradient rolled the update back."""

    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clip_fraction: float
    grad_norm: float
    skipped: bool = False

    @classmethod
    def rolled_back(cls) -> UpdateStats:
        return cls(*[math.nan] * len(LOSS_TERMS), math.nan, skipped=True)

    def metrics(self) -> dict[str, float]:
        """The TensorBoard scalars of the update."""
        return {"loss/policy": self.policy_loss, "loss/value": self.value_loss, "loss/entropy": self.entropy,
                "loss/approx_kl": self.approx_kl, "loss/clip_fraction": self.clip_fraction,
                "loss/grad_norm": self.grad_norm}


class _Sums:
    """This worker's share of the means :class:`UpdateStats` reports, summed over minibatches (by field name)."""

    def __init__(self):
        self.values = {f.name: 0.0 for f in fields(UpdateStats) if f.name != "skipped"}
        self.minibatches = 0

    def add(self, terms: dict[str, torch.Tensor], grad_norm: float, global_samples: float, world_size: int) -> None:
        # loss terms are sums over this worker's samples: divided by every worker's count they add up to the mean;
        # the gradient norm, the same on every worker after the all-reduce, is shared out equally
        for name in LOSS_TERMS:
            self.values[name] += terms[name].item() / global_samples
        self.values["grad_norm"] += grad_norm / world_size
        self.minibatches += 1

    def means(self, info: DistInfo) -> UpdateStats:
        return UpdateStats(*(all_reduce_sum(list(self.values.values()), info) / self.minibatches).tolist())


def ppo_update(policy, optimizer, grads: FlatGradients, storage: RolloutStorage, ppo, info: DistInfo,
               grad_weighting: GradWeighting = GradWeighting.samples) -> UpdateStats:
    """PPO epochs over environment-split minibatches. Each rank sums its per-sample losses and divides by the
    minibatch's sample count over all ranks, and gradients are summed across ranks: the update equals a single
    process's update on the concatenated samples, whatever share each rank collected. (``grad_weighting=ranks``
    divides by its own count times the number of ranks instead: each rank's mean gradient, averaged with equal
    weight, as habitat-baselines' DistributedDataParallel does.)

    With ``ppo.normalize_advantages`` the rollout's advantages (``storage.advantages``, replaced in place) are
    normalised first, with the mean and variance of every rank's rollout (all-reduced), so this stays one update
    over the concatenation of all workers' samples.

    A NaN/Inf loss on any rank, or a NaN/Inf gradient, skips the whole update on every rank: the policy (weights
    and normaliser statistics) and the optimiser go back to where they were before it."""
    # what to roll back to: earlier minibatches' steps and the normaliser's statistics of a bad batch must go too
    before = ({k: v.detach().clone() for k, v in policy.state_dict().items()}, optimizer_snapshot(optimizer))
    if ppo.normalize_advantages:
        valid = storage.advantages[: storage.step]
        valid.copy_(normalized_advantages(valid, lambda values: all_reduce_sum(values, info)))
    sums = _Sums()
    for _epoch in range(ppo.ppo_epoch):
        for batch in storage.minibatches(ppo.num_mini_batch):
            if not _learn_minibatch(policy, optimizer, grads, batch, ppo, info, grad_weighting, sums):
                policy.load_state_dict(before[0])
                optimizer.load_state_dict(before[1])
                grads.zero_()
                return UpdateStats.rolled_back()
    return sums.means(info)


def _learn_minibatch(policy, optimizer, grads: FlatGradients, batch: Minibatch, ppo, info: DistInfo,
                     grad_weighting: GradWeighting, sums: _Sums) -> bool:
    """One optimiser step on ``batch``, its statistics added to ``sums``; False, with nothing stepped, when the loss
    (on any rank) or the all-reduced gradient is NaN/Inf."""
    # NaN logits give a NaN loss, caught below on every rank
    log_probs, values, entropy = policy.evaluate_actions(batch.obs, batch.prev_actions, batch.masks, batch.hidden0,
                                                         batch.actions)
    loss, terms = ppo_loss(
        log_probs, batch.old_log_probs, batch.advantages, values, batch.old_values, batch.returns, entropy, ppo,
        reduction="sum",
    )
    # a bad loss on any rank rides on the sample-count all-reduce, so every rank skips together
    global_samples, bad_ranks = all_reduce_sum([batch.num_samples, float(not torch.isfinite(loss))], info).tolist()
    if bad_ranks > 0:
        return False
    grads.zero_()
    divisor = global_samples if grad_weighting == GradWeighting.samples else batch.num_samples * info.world_size
    (loss / divisor).backward()
    if info.enabled:
        grads.all_reduce_()
    grad_norm = grads.clip_norm_(ppo.max_grad_norm)
    if not torch.isfinite(grad_norm):  # all-reduced gradients: every rank has this same norm
        return False
    optimizer.step()
    sums.add(terms, grad_norm.item(), global_samples, info.world_size)
    return True


def optimizer_snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """A copy of the optimiser's state dict to roll back to: its tensors cloned, the rest deep-copied (a deepcopy
    of the whole dict walks every tensor in Python, a noticeable share of a small update)."""
    state = optimizer.state_dict()
    return {"state": {k: {n: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for n, v in s.items()}
                      for k, s in state["state"].items()},
            "param_groups": copy.deepcopy(state["param_groups"])}
