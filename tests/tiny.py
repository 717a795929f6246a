"""The smallest agent the trainer tests run, defined once; each test file adds its own rollout sizes and extras.

(pytest puts tests/ on sys.path, so test modules import this as ``from tiny import ...``.)"""

from __future__ import annotations

TINY_AGENT = ["sim.resolution=16", "sim.sensors=[depth]", "policy.encoder=simple_cnn", "policy.base_planes=8",
              "policy.hidden_size=32", "policy.rnn_type=gru", "policy.num_recurrent_layers=1", "device=cpu"]
"""A 16² depth agent: simple CNN with 8 base planes, GRU 32, on the CPU."""


def tiny(num_envs: int, num_steps: int, *extra: str) -> list[str]:
    """TINY_AGENT training ``num_envs`` x ``num_steps`` rollouts as one minibatch, no final evaluation, ``extra``
    last (so it can override any of these)."""
    return [*TINY_AGENT, f"ppo.num_envs={num_envs}", f"ppo.num_steps={num_steps}", "ppo.num_mini_batch=1",
            "eval_episodes=0", *extra]


def quiet(*_args, **_kwargs) -> None:
    """A ``log`` for train() and generate_dataset() that keeps test output to pytest's own."""
