"""One DD-PPO update on every torchrun rank, built from the trainer's own pieces, with a different number of
samples per rank (rank 1's rollout is "preempted" after 3 of 8 steps).

    torchrun --nproc-per-node 2 tests/helpers/dist_grad_check.py OUT_DIR

Mirrors the update of ``ddppo/trainer/loop.py``: ``broadcast_module`` for identical initial weights, a
``RolloutStorage`` filled by ``policy.act``, ``policy.evaluate_actions`` in training mode (the visual running
normaliser all-reduces its statistics), ``ppo_loss(reduction="sum")`` divided by the all-reduced sample count
(``all_reduce_sum``), the gradients all-reduced and clipped as one flat buffer (``FlatGradients``) and one
Adam step. Each rank writes
``OUT_DIR/rank{r}.pt`` with its minibatch, the initial state, its local and all-reduced gradients and the state
after the step; the test recomputes the same update in one process on the concatenated batch.

The same update is also run through the trainer's own ``ddppo.trainer.loop.ppo_update`` on a copy of the policy taken
just before it (``trainer_state`` in the dump), so the trainer's code is checked, not only its pieces; once more
with ``ddppo.grad_weighting=ranks`` (``trainer_grads_ranks``: each rank's mean gradient, averaged); and once more
with ``ppo.normalize_advantages=true`` (``trainer_state_normalized``), whose advantages must be normalised over
both ranks' rollouts together.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import torch

import ddppo.trainer.loop as trainer
from ddppo.config import load_config
from ddppo.distributed import all_reduce_sum, broadcast_module, init_distributed
from ddppo.policy import Policy
from ddppo.rl.flat_grads import FlatGradients
from ddppo.rl.ppo import make_adam, ppo_loss
from ddppo.rl.storage import RolloutStorage

NUM_STEPS = 8
NUM_ENVS = 2
RES = 16
ROLLOUT_STEPS = {0: 8, 1: 3}  # rank -> steps collected (rank 1 preempted: different sample counts)
POLICY_OVERRIDES = [
    "policy.encoder=simple_cnn",
    "policy.base_planes=8",
    "policy.hidden_size=16",
    "policy.rnn_type=gru",
    "policy.num_recurrent_layers=1",
    "ppo.max_grad_norm=0.2",
    "ppo.ppo_epoch=1",
    "ppo.num_mini_batch=1",
]
OBS_SPACES = {
    "depth": ((RES, RES, 1), torch.float32),
    "pointgoal_with_gps_compass": ((2,), torch.float32),
}


def random_obs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "depth": torch.rand(NUM_ENVS, RES, RES, 1, generator=gen),
        "pointgoal_with_gps_compass": torch.randn(NUM_ENVS, 2, generator=gen) * 2,
    }


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    info = init_distributed("cpu", "gloo")
    cfg = load_config(None, POLICY_OVERRIDES)
    torch.manual_seed(100 + info.rank)  # different weights per rank: the broadcast must make them identical
    policy = Policy(OBS_SPACES, cfg.policy)
    broadcast_module(policy, info)
    init_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    params = [p for p in policy.parameters() if p.requires_grad]
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    optimizer = make_adam(params, lr=cfg.ppo.lr, eps=cfg.ppo.eps)

    gen = torch.Generator().manual_seed(1234 + info.rank)
    storage = RolloutStorage(NUM_STEPS, NUM_ENVS, OBS_SPACES, (policy.num_hidden_layers, cfg.policy.hidden_size))
    storage.set_first_observation(random_obs(gen), torch.randn(policy.num_hidden_layers, NUM_ENVS,
                                                               cfg.policy.hidden_size, generator=gen),
                                  torch.ones(NUM_ENVS))
    policy.eval()  # rollouts in eval mode, as the trainer does
    for t in range(ROLLOUT_STEPS[info.rank]):
        with torch.no_grad():
            obs_t = {k: v[t] for k, v in storage.obs.items()}
            actions, log_probs, values, hidden = policy.act(obs_t, storage.prev_actions[t], storage.masks[t],
                                                            storage.hidden[t])
        done = torch.rand(NUM_ENVS, generator=gen) < 0.25
        rewards = torch.randn(NUM_ENVS, generator=gen)
        storage.insert(random_obs(gen), hidden, actions, log_probs, values, rewards, (~done).float(),
                       (~done).float())
    with torch.no_grad():
        s = storage.step
        _, next_value, _ = policy({k: v[s] for k, v in storage.obs.items()}, storage.prev_actions[s],
                                  storage.masks[s], storage.hidden[s])
    storage.compute_returns(next_value, cfg.ppo.gamma, cfg.ppo.tau)

    policy_copy = copy.deepcopy(policy)  # same weights and normaliser statistics, for ddppo.trainer.loop.ppo_update
    policy_normalized = copy.deepcopy(policy)  # and for it with ppo.normalize_advantages
    policy_ranks = copy.deepcopy(policy)  # and with ddppo.grad_weighting=ranks

    policy.train()
    (batch,) = list(storage.minibatches(1))
    log_probs, values, entropy = policy.evaluate_actions(batch.obs, batch.prev_actions, batch.masks,
                                                         batch.hidden0, batch.actions)
    loss, _ = ppo_loss(log_probs, batch.old_log_probs, batch.advantages, values, batch.old_values,
                       batch.returns, entropy, cfg.ppo, reduction="sum")
    n_global = all_reduce_sum([batch.num_samples], info)[0].item()
    grads = FlatGradients(params)
    grads.zero_()
    (loss / n_global).backward()
    local_grads = {n: p.grad.detach().clone() for n, p in zip(names, params)}
    grads.all_reduce_()
    reduced_grads = {n: p.grad.detach().clone() for n, p in zip(names, params)}
    grad_norm = grads.clip_norm_(cfg.ppo.max_grad_norm)
    optimizer.step()

    # the trainer's own update function, same data, same starting point
    copy_params = [p for p in policy_copy.parameters() if p.requires_grad]
    copy_optimizer = make_adam(copy_params, lr=cfg.ppo.lr, eps=cfg.ppo.eps)
    policy_copy.train()
    trainer_losses = trainer.ppo_update(policy_copy, copy_optimizer, FlatGradients(copy_params), storage, cfg.ppo,
                                        info)
    ranks_params = [p for p in policy_ranks.parameters() if p.requires_grad]
    policy_ranks.train()
    trainer.ppo_update(policy_ranks, make_adam(ranks_params, lr=cfg.ppo.lr, eps=cfg.ppo.eps),
                       FlatGradients(ranks_params), storage, cfg.ppo, info, grad_weighting="ranks")
    # last: with ppo.normalize_advantages the update normalises storage.advantages in place
    normalized_cfg = load_config(None, [*POLICY_OVERRIDES, "ppo.normalize_advantages=true"])
    normalized_params = [p for p in policy_normalized.parameters() if p.requires_grad]
    policy_normalized.train()
    trainer.ppo_update(policy_normalized, make_adam(normalized_params, lr=cfg.ppo.lr, eps=cfg.ppo.eps),
                       FlatGradients(normalized_params), storage, normalized_cfg.ppo, info)

    torch.save({
        "rank": info.rank,
        "world_size": info.world_size,
        "num_samples": batch.num_samples,
        "n_global": n_global,
        "batch": {k: v for k, v in batch._asdict().items() if k != "num_samples"},
        "init_state": init_state,
        "local_grads": local_grads,
        "reduced_grads": reduced_grads,
        "grad_norm": grad_norm.detach().clone(),
        "final_state": {k: v.detach().clone() for k, v in policy.state_dict().items()},
        "trainer_state": {k: v.detach().clone() for k, v in policy_copy.state_dict().items()},
        "trainer_state_normalized": {k: v.detach().clone() for k, v in policy_normalized.state_dict().items()},
        # one minibatch, one epoch: the gradient the update stepped with (all-reduced, clipped)
        "trainer_grads_normalized": {n: p.grad.detach().clone() for n, p in policy_normalized.named_parameters()
                                     if p.requires_grad},
        "trainer_grads_ranks": {n: p.grad.detach().clone() for n, p in policy_ranks.named_parameters()
                                if p.requires_grad},
        "trainer_losses": torch.tensor(dataclasses.astuple(trainer_losses), dtype=torch.float64),
        "policy_overrides": POLICY_OVERRIDES,
    }, out / f"rank{info.rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
