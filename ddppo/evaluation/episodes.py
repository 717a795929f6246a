"""The one loop that runs agents in a batched environment (:func:`agent_steps`: act, step, carry the previous
action and the episode-start masks), shared by evaluation, videos and the throughput bench, and the agents it runs:
a policy with its recurrent state, and the reference agents (shortest-path oracle, random, always-forward)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ddppo.sim.geometry import MOVE_FORWARD


class Agent(Protocol):
    def act(self, obs: dict[str, Tensor], prev_actions: Tensor, masks: Tensor) -> Tensor:
        """Actions [N] for the observations; ``masks`` 0 marks an episode's first step, ``prev_actions`` the
        actions before these observations."""


class AgentStep(NamedTuple):
    """One step of :func:`agent_steps`: the actions taken, the environment's StepResult, and the seconds the agent
    and the environment took (measured with ``clock`` when one was given, else 0)."""

    actions: Tensor
    result: object
    act_seconds: float = 0.0
    step_seconds: float = 0.0


@torch.no_grad()
def agent_steps(envs, agent: Agent, obs: dict[str, Tensor] | None = None, max_steps: int | None = None,
                clock: Callable[[], float] | None = None) -> Iterator[AgentStep]:
    """Act and step until no environment is active (every env ran its share of episodes), or ``max_steps``.

    Starts from ``obs`` (``envs.reset()`` when None) with every env at an episode start; after each step the
    result's observations, the actions and ``~done`` become the agent's next inputs. The caller may stop early,
    or mark an env inactive between steps (a video ends after one episode)."""
    obs = envs.reset() if obs is None else obs
    prev = torch.zeros(envs.num_envs, dtype=torch.long)
    masks = torch.zeros(envs.num_envs)
    steps = 0
    timed = clock or (lambda: 0.0)
    while envs.active.any() and (max_steps is None or steps < max_steps):
        t0 = timed()
        actions = agent.act(obs, prev, masks)
        t1 = timed()
        result = envs.step(actions)
        t2 = timed()
        yield AgentStep(actions, result, t1 - t0, t2 - t1)
        steps += 1
        obs, prev, masks = result.obs, actions.long().cpu(), (~result.done).float().cpu()


class PolicyAgent:
    """A policy with its recurrent state; ``masks`` 0 marks an episode start (state and previous action reset).

    After each act it keeps what a rollout stores: the observations it acted on (``obs``, pooled as the storage
    keeps them), ``hidden``, ``log_probs`` and ``values``. Actions are returned on ``actions_device`` (the
    simulator's)."""

    def __init__(self, policy, num_envs: int, device, deterministic: bool = True, actions_device="cpu"):
        self.policy, self.device, self.deterministic = policy, torch.device(device), deterministic
        self.actions_device = torch.device(actions_device)
        self.hidden = policy.initial_hidden(num_envs, self.device)
        self.obs: dict[str, Tensor] = {}
        self.log_probs = self.values = torch.empty(0)

    @torch.no_grad()
    def act(self, obs, prev_actions, masks):
        self.obs = self.policy.preprocess({k: v.to(self.device) for k, v in obs.items()})
        actions, self.log_probs, self.values, self.hidden = self.policy.act(
            self.obs, prev_actions.to(self.device), masks.to(self.device), self.hidden,
            deterministic=self.deterministic)
        return actions.to(self.actions_device)


class OracleAgent:
    """The backend's shortest-path follower (the embedded geodesic descent, habitat's GreedyGeodesicFollower)."""

    def __init__(self, envs):
        self.envs = envs

    def act(self, obs, prev_actions, masks):
        return self.envs.oracle_actions().cpu()


class RandomAgent:
    """Uniform over the four actions (so it mostly STOPs early: the floor of every metric)."""

    def __init__(self, num_envs: int, seed: int = 0):
        self.n, self.gen = num_envs, torch.Generator().manual_seed(seed)

    def act(self, obs, prev_actions, masks):
        return torch.randint(0, 4, (self.n,), generator=self.gen)


class ForwardAgent:
    def __init__(self, num_envs: int):
        self.n = num_envs

    def act(self, obs, prev_actions, masks):
        return torch.full((self.n,), MOVE_FORWARD)


