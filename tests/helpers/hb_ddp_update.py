"""One DD-PPO update on two Gloo ranks, by ddppo's trainer update and by habitat-baselines' DDPPO, from the same
weights and the same minibatches, with a different number of samples per rank (rank 1's rollout is "preempted"
after 3 of 8 steps).

    torchrun --nproc-per-node 2 tests/helpers/hb_ddp_update.py OUT_DIR DDPPO_POINTNAV_YAML

ddppo's side: ``ppo_update`` (ddppo's trainer update) with the preset configs/pointnav/habitat_baselines.yaml's
``ppo`` and ``ddppo`` settings (``ddppo.grad_weighting=ranks``), one epoch of one minibatch, on a tiny policy.

habitat-baselines' side: its ``DDPPO`` updater built by ``DDPPO.from_config`` from ``habitat_baselines.rl.ppo`` of
ddppo_pointnav.yaml composed by its config system, ``init_distributed(find_unused_params=False)`` as its
PPOTrainer calls it (DistributedDataParallel around the actor-critic), and one ``_update_from_batch`` on the same
minibatch: its loss (means over the rank's samples), DDP's gradient all-reduce, its grad-norm clip and its Adam
step. The actor-critic is a copy of the same ddppo policy behind ``AsNetPolicy``, which only reshapes
habitat-baselines' flat ``[T * N, 1]`` samples into ddppo's ``[T, N]`` sequences.

Each rank writes ``OUT_DIR/rank{r}.pt``: its sample count, the initial weights, and for each side the gradients
it stepped with and the weights after the step; and the gradients of ddppo's update with its default weighting
(``grad_weighting=samples``), which the test shows differ.
"""

from __future__ import annotations

import collections
import copy
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))  # helpers.habitat_baselines_import

from helpers.habitat_baselines_import import import_habitat_baselines  # noqa: E402

from ddppo.config import load_config  # noqa: E402
from ddppo.distributed import broadcast_module, init_distributed  # noqa: E402
from ddppo.policy import Policy  # noqa: E402
from ddppo.rl.flat_grads import FlatGradients  # noqa: E402
from ddppo.rl.ppo import make_adam  # noqa: E402
from ddppo.rl.storage import RolloutStorage  # noqa: E402
from ddppo.trainer.update import ppo_update  # noqa: E402

PRESET = TESTS.parent / "configs" / "pointnav" / "habitat_baselines.yaml"
NUM_STEPS, NUM_ENVS, RES = 8, 2, 16
ROLLOUT_STEPS = {0: 8, 1: 3}  # rank -> steps collected: different sample counts
OVERRIDES = ["sim.sensors=[depth]", f"sim.resolution={RES}", "policy.encoder=simple_cnn", "policy.base_planes=8",
             "policy.hidden_size=16", "policy.rnn_type=gru", "policy.num_recurrent_layers=1", "policy.avgpool=1",
             f"ppo.num_envs={NUM_ENVS}", f"ppo.num_steps={NUM_STEPS}", "ppo.ppo_epoch=1", "ppo.num_mini_batch=1"]
"""A tiny policy and one epoch of one minibatch; the loss, clip, optimiser and weighting settings are the preset's."""
OBS_SPACES = {"depth": ((RES, RES, 1), torch.float32), "pointgoal_with_gps_compass": ((2,), torch.float32)}


class AsNetPolicy(torch.nn.Module):
    """ddppo's policy behind the part of habitat-baselines' NetPolicy interface its PPO calls: samples flattened
    ``[T * N, ...]`` (environment-major within a step, as ddppo's minibatch is) reshaped to ``[T, N]`` and back."""

    def __init__(self, policy, t_len: int, n: int):
        super().__init__()
        self.policy, self.t_len, self.n = policy, t_len, n

    def _seq(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.t_len, self.n, *x.shape[1:])

    def evaluate_actions(self, observations, rnn_hidden_states, prev_actions, masks, action, rnn_build_seq_info):
        log_probs, values, entropy = self.policy.evaluate_actions(
            {k: self._seq(v) for k, v in observations.items()}, self._seq(prev_actions)[..., 0],
            self._seq(masks)[..., 0], rnn_hidden_states, self._seq(action)[..., 0])
        return values.reshape(-1, 1), log_probs.reshape(-1, 1), entropy.reshape(-1, 1), None, {}

    def policy_parameters(self):
        return self.parameters()

    def aux_loss_parameters(self):
        return {}


def random_obs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"depth": torch.rand(NUM_ENVS, RES, RES, 1, generator=gen),
            "pointgoal_with_gps_compass": torch.randn(NUM_ENVS, 2, generator=gen) * 2}


def rollout(policy, cfg, rank: int) -> RolloutStorage:
    """This rank's rollout: ``ROLLOUT_STEPS[rank]`` steps of random observations, the policy's own actions, values
    and log-probabilities, random rewards and episode ends; returns by GAE."""
    gen = torch.Generator().manual_seed(1234 + rank)
    storage = RolloutStorage(NUM_STEPS, NUM_ENVS, OBS_SPACES, (policy.num_hidden_layers, cfg.policy.hidden_size))
    storage.set_first_observation(random_obs(gen), torch.randn(policy.num_hidden_layers, NUM_ENVS,
                                                               cfg.policy.hidden_size, generator=gen),
                                  torch.ones(NUM_ENVS))
    policy.eval()
    for t in range(ROLLOUT_STEPS[rank]):
        with torch.no_grad():
            actions, log_probs, values, hidden = policy.act({k: v[t] for k, v in storage.obs.items()},
                                                            storage.prev_actions[t], storage.masks[t],
                                                            storage.hidden[t])
        not_done = (torch.rand(NUM_ENVS, generator=gen) > 0.25).float()
        storage.insert(random_obs(gen), hidden, actions, log_probs, values, torch.randn(NUM_ENVS, generator=gen),
                       not_done, not_done)
    s = storage.step
    with torch.no_grad():
        _, next_value, _ = policy({k: v[s] for k, v in storage.obs.items()}, storage.prev_actions[s],
                                  storage.masks[s], storage.hidden[s])
    storage.compute_returns(next_value, cfg.ppo.gamma, cfg.ppo.tau)
    return storage


def habitat_baselines_batch(batch) -> dict:
    """ddppo's minibatch in the keys and flat ``[T * N, 1]`` shapes of habitat-baselines' data generator."""
    def flat(x):
        return x.reshape(-1, 1)

    return {"observations": {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.obs.items()},
            "recurrent_hidden_states": batch.hidden0, "prev_actions": flat(batch.prev_actions),
            "masks": flat(batch.masks.bool()), "actions": flat(batch.actions),
            "action_log_probs": flat(batch.old_log_probs), "value_preds": flat(batch.old_values),
            "returns": flat(batch.returns), "advantages": flat(batch.advantages)}


def main() -> int:
    out, yaml = Path(sys.argv[1]), sys.argv[2]
    import_habitat_baselines()
    from habitat_baselines.config.default import get_config
    from habitat_baselines.rl.ddppo.algo.ddppo import DDPPO

    info = init_distributed("cpu", "gloo")
    cfg = load_config(PRESET, OVERRIDES)
    assert cfg.ddppo.grad_weighting == "ranks"
    torch.manual_seed(100 + info.rank)  # different weights per rank: the broadcast makes them identical
    policy = Policy(OBS_SPACES, cfg.policy)
    broadcast_module(policy, info)
    init_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    storage = rollout(policy, cfg, info.rank)
    theirs, samples = copy.deepcopy(policy), copy.deepcopy(policy)

    # ddppo: the trainer's update with the preset's settings
    params = [p for p in policy.parameters() if p.requires_grad]
    policy.train()
    ppo_update(policy, make_adam(params, lr=cfg.ppo.lr, eps=cfg.ppo.eps), FlatGradients(params), storage, cfg.ppo,
               info, cfg.ddppo.grad_weighting)

    # the same with ddppo's own weighting (grad_weighting=samples): the test shows it differs from theirs
    samples_params = [p for p in samples.parameters() if p.requires_grad]
    samples.train()
    ppo_update(samples, make_adam(samples_params, lr=cfg.ppo.lr, eps=cfg.ppo.eps), FlatGradients(samples_params),
               storage, cfg.ppo, info, "samples")

    # habitat-baselines: DDPPO from ddppo_pointnav.yaml's rl.ppo, DistributedDataParallel as its trainer sets it up
    (batch,) = list(storage.minibatches(1))
    agent = DDPPO.from_config(AsNetPolicy(theirs, storage.step, NUM_ENVS), get_config(yaml).habitat_baselines.rl.ppo)
    agent.init_distributed(find_unused_params=False)
    agent.train()
    agent._update_from_batch(habitat_baselines_batch(batch), 0, None, collections.defaultdict(list))

    torch.save({
        "rank": info.rank, "num_samples": batch.num_samples, "init_state": init_state,
        "ours_grads": {n: p.grad.detach().clone() for n, p in policy.named_parameters()},
        "theirs_grads": {n: p.grad.detach().clone() for n, p in theirs.named_parameters()},
        "ours_state": {n: p.detach().clone() for n, p in policy.named_parameters()},
        "theirs_state": {n: p.detach().clone() for n, p in theirs.named_parameters()},
        "samples_grads": {n: p.grad.detach().clone() for n, p in samples.named_parameters()},
    }, out / f"rank{info.rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
