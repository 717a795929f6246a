"""Rollout storage for recurrent policies (DD-PPO, habitat-baselines layout).

Index convention (``T = num_steps``, ``N = num_envs``, ``L, H = hidden_shape``)::

    obs[k][t], hidden[t], prev_actions[t], masks[t]     what the policy saw when choosing actions[t]  [T + 1]
    actions[t], log_probs[t], values[t], rewards[t], not_done[t]      step t   [T] (values: [T + 1])

Index ``t + 1`` of the first group is written together with step ``t`` (:meth:`RolloutStorage.insert`), so
index ``step`` always holds the observation to act on next. A DD-PPO rollout may be preempted before ``T``
steps; :attr:`RolloutStorage.step` counts the valid steps and everything (returns, minibatches, sample count,
:meth:`RolloutStorage.after_update`) uses only the first ``step`` of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ddppo.numpy_views import HostViews
from ddppo.rl.ppo import gae

__all__ = ["RolloutStorage", "Minibatch", "ObsSpaces"]

ObsSpaces = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
"""Observation name -> (per-env shape, dtype)."""

# Attribute names of every non-observation tensor (used by to(), state_dict() and load_state_dict()); those on the
# observation side have T + 1 rows (row t is what the policy saw before step t; values' last is the bootstrap).
_STEP_TENSORS: tuple[str, ...] = (
    "hidden",
    "prev_actions",
    "masks",
    "actions",
    "log_probs",
    "values",
    "rewards",
    "not_done",
    "advantages",
    "returns",
)
_OBSERVATION_SIDE = frozenset({"hidden", "prev_actions", "masks", "values"})


class Minibatch(NamedTuple):
    """Whole sequences of ``nb`` environments over the rollout's ``t = step`` valid steps."""

    obs: dict[str, Tensor]
    """``[t, nb, *shape]`` each."""
    hidden0: Tensor
    """``[L, nb, H]``, the recurrent state before ``obs[0]``."""
    prev_actions: Tensor
    """``[t, nb]``, as are ``masks`` .. ``advantages``."""
    masks: Tensor
    actions: Tensor
    old_log_probs: Tensor
    old_values: Tensor
    returns: Tensor
    advantages: Tensor
    env_indices: Tensor
    """``[nb]`` long: which environments these are."""
    num_samples: int
    """``t * nb``."""


class RolloutStorage:
    """Fixed-size rollout buffer of ``num_steps`` steps for ``num_envs`` environments and a recurrent policy.

    Attributes:
        obs: ``dict`` of ``[T + 1, N, *shape]`` tensors (dtype from ``obs_spaces``).
        hidden: ``[T + 1, L, N, H]`` recurrent state *before* processing ``obs[t]``.
        prev_actions: ``[T + 1, N]`` long, the action taken before ``obs[t]`` (0 at the start; ``masks`` says
            that a new episode begins there).
        masks: ``[T + 1, N]`` float, 0 where ``obs[t]`` starts a new episode, else 1.
        actions: ``[T, N]`` long.
        log_probs: ``[T, N]`` log-probability of ``actions[t]`` under the rollout policy.
        values: ``[T + 1, N]`` value estimates; ``values[step]`` is the bootstrap value.
        rewards: ``[T, N]``.
        not_done: ``[T, N]`` float, 0 where the episode ended at step ``t``.
        advantages, returns: ``[T, N]``, filled by :meth:`compute_returns` (first ``step`` entries).
        step: number of valid steps filled in this rollout (``0 <= step <= T``).
    """

    def __init__(
        self,
        num_steps: int,
        num_envs: int,
        obs_spaces: ObsSpaces,
        hidden_shape: tuple[int, int],
        device: torch.device | str = "cpu",
    ) -> None:
        """Allocate zero-filled storage.

        Args:
            num_steps: rollout length ``T`` (per environment).
            num_envs: number of environments ``N`` on this worker.
            obs_spaces: observation name -> (per-env shape, dtype).
            hidden_shape: ``(num_layers, hidden_size)`` of the recurrent state.
            device: where all tensors live.
        """
        if num_steps < 1 or num_envs < 1:
            raise ValueError(f"num_steps and num_envs must be >= 1, got {num_steps} and {num_envs}")
        self.num_steps = int(num_steps)
        self.num_envs = int(num_envs)
        self.hidden_shape = (int(hidden_shape[0]), int(hidden_shape[1]))
        self.device = torch.device(device)
        t, n = self.num_steps, self.num_envs
        num_layers, hidden_size = self.hidden_shape
        kw: dict[str, Any] = {"device": self.device}

        self.obs: dict[str, Tensor] = {
            key: torch.zeros((t + 1, n, *shape), dtype=dtype, **kw)
            for key, (shape, dtype) in obs_spaces.items()
        }
        self.hidden = torch.zeros(t + 1, num_layers, n, hidden_size, **kw)
        self.prev_actions = torch.zeros(t + 1, n, dtype=torch.long, **kw)
        self.masks = torch.zeros(t + 1, n, **kw)
        self.actions = torch.zeros(t, n, dtype=torch.long, **kw)
        self.log_probs = torch.zeros(t, n, **kw)
        self.values = torch.zeros(t + 1, n, **kw)
        self.rewards = torch.zeros(t, n, **kw)
        self.not_done = torch.zeros(t, n, **kw)
        self.advantages = torch.zeros(t, n, **kw)
        self.returns = torch.zeros(t, n, **kw)
        self.step = 0
        self.returns_computed = False
        """True once :meth:`compute_returns` ran for the current ``step``; :meth:`minibatches` requires it."""
        self._make_host_views()

    # ------------------------------------------------------------------ filling
    @property
    def num_samples(self) -> int:
        """Number of valid samples in this rollout: ``step * num_envs``."""
        return self.step * self.num_envs

    def set_first_observation(
        self,
        obs: Mapping[str, Tensor],
        hidden: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> None:
        """Write the observation at index ``step`` (normally 0, right after an environment reset).

        ``hidden`` defaults to zeros, ``masks`` to zeros (a new episode starts); ``prev_actions`` is set to
        0.
        """
        s = self.step
        self._copy_obs(s, obs)
        if hidden is None:
            self.hidden[s].zero_()
        else:
            self.hidden[s].copy_(hidden)
        if masks is None:
            self.masks[s].zero_()
        else:
            self.masks[s].copy_(masks.reshape(self.num_envs))
        self.prev_actions[s].zero_()

    def insert(
        self,
        obs: Mapping[str, Tensor],
        hidden: Tensor,
        actions: Tensor,
        log_probs: Tensor,
        values: Tensor,
        rewards: Tensor,
        not_done: Tensor,
        masks: Tensor,
    ) -> None:
        """Record step ``t = step`` and the observation it led to, then advance ``step``.

        Args:
            obs: NEXT observations, each ``[N, *shape]`` (written at ``t + 1``).
            hidden: recurrent state after processing ``obs[t]``, ``[L, N, H]`` (written at ``t + 1``).
            actions: ``[N]`` actions taken at ``t`` (written at ``t`` and as ``prev_actions[t + 1]``).
            log_probs: ``[N]`` log-probabilities of ``actions`` (written at ``t``).
            values: ``[N]`` ``V(obs[t])`` (written at ``t``).
            rewards: ``[N]`` rewards for step ``t`` (written at ``t``). Fold time-limit bootstraps in first
                (see :func:`ddppo.rl.ppo.bootstrap_truncated`).
            not_done: ``[N]``, 0 where the episode ended at step ``t`` (written at ``t``).
            masks: ``[N]``, 0 where the NEXT observation starts a new episode (written at ``t + 1``).

        Trailing singleton dimensions (``[N, 1]``) are accepted for the ``[N]`` arguments.
        """
        t = self.step
        if t >= self.num_steps:
            raise RuntimeError(f"RolloutStorage is full ({self.num_steps} steps); call after_update() first")
        self._copy_obs(t + 1, obs)
        for buf, index, src in ((self.hidden, t + 1, hidden), (self.actions, t, actions),
                                (self.prev_actions, t + 1, actions), (self.log_probs, t, log_probs),
                                (self.values, t, values), (self.rewards, t, rewards), (self.not_done, t, not_done),
                                (self.masks, t + 1, masks)):
            self._write_row(buf, index, src)
        self.step = t + 1
        self.returns_computed = False

    def _copy_obs(self, index: int, obs: Mapping[str, Tensor]) -> None:
        missing = set(self.obs) - set(obs)
        if missing:
            raise KeyError(f"observation is missing keys {sorted(missing)}")
        for key, buf in self.obs.items():
            self._write_row(buf, index, obs[key])

    def _write_row(self, buf: Tensor, index: int, src: Tensor) -> None:
        """``buf[index] = src`` reshaped to the row (``[N, 1]`` fits ``[N]``). On the CPU through the buffers' numpy
        views: a step writes a dozen small rows, and torch's index + copy_ (+ reshape) cost more than the copy there."""
        if self._host is not None and src.is_cpu and not src.requires_grad:
            row = self._host.view(buf)[index]
            row[...] = src.numpy().reshape(row.shape)
        else:
            row = buf[index]
            row.copy_(src.reshape(row.shape))

    def _make_host_views(self) -> None:
        # numpy views of the buffers, made once per device (see ddppo.numpy_views.HostViews)
        self._host = (HostViews(*self.obs.values(), *(getattr(self, name) for name in _STEP_TENSORS))
                      if self.device.type == "cpu" else None)

    # ------------------------------------------------------------------ returns
    def compute_returns(self, next_value: Tensor, gamma: float, lam: float) -> None:
        """Set ``values[step] = next_value`` and run :func:`ddppo.rl.ppo.gae` over the first ``step`` steps.

        ``next_value`` (``[N]``) is ``V(obs[step])``; it bootstraps envs whose last step was not terminal,
        which covers both the end of the rollout and a DD-PPO preemption. Entries past ``step`` are zeroed.
        """
        s = self.step
        if s == 0:
            raise RuntimeError("compute_returns() called on an empty rollout (step == 0)")
        self.values[s].copy_(next_value.reshape(self.num_envs))
        advantages, returns = gae(self.rewards[:s], self.values[: s + 1], self.not_done[:s], gamma, lam)
        self.advantages.zero_()
        self.returns.zero_()
        self.advantages[:s].copy_(advantages)
        self.returns[:s].copy_(returns)
        self.returns_computed = True

    # ------------------------------------------------------------------ sampling
    def minibatches(
        self, num_mini_batch: int, generator: torch.Generator | None = None
    ) -> Iterator[Minibatch]:
        """Yield ``num_mini_batch`` :class:`Minibatch` es that split the ENVIRONMENTS, keeping every sequence whole.

        Environments are randomly permuted (with ``generator`` if given; it must be a CPU generator) and split
        into ``num_mini_batch`` groups whose sizes differ by at most one, so every env appears exactly once.
        """
        if num_mini_batch < 1:
            raise ValueError(f"num_mini_batch must be >= 1, got {num_mini_batch}")
        if num_mini_batch > self.num_envs:
            raise ValueError(
                f"num_mini_batch ({num_mini_batch}) must not exceed num_envs ({self.num_envs}): "
                "minibatches split environments so that recurrent sequences stay whole"
            )
        if self.step == 0:
            raise RuntimeError("minibatches() called on an empty rollout (step == 0)")
        if not self.returns_computed:
            raise RuntimeError("call compute_returns() before minibatches()")
        t = self.step
        perm = torch.randperm(self.num_envs, generator=generator)
        for inds in torch.tensor_split(perm, num_mini_batch):
            inds = inds.to(self.device)
            yield Minibatch(
                obs={key: buf[:t].index_select(1, inds) for key, buf in self.obs.items()},
                hidden0=self.hidden[0].index_select(1, inds),
                prev_actions=self.prev_actions[:t].index_select(1, inds),
                masks=self.masks[:t].index_select(1, inds),
                actions=self.actions[:t].index_select(1, inds),
                old_log_probs=self.log_probs[:t].index_select(1, inds),
                old_values=self.values[:t].index_select(1, inds),
                returns=self.returns[:t].index_select(1, inds),
                advantages=self.advantages[:t].index_select(1, inds),
                env_indices=inds,
                num_samples=t * int(inds.numel()),
            )

    # ------------------------------------------------------------------ bookkeeping
    def after_update(self) -> None:
        """Begin the next rollout: copy entry ``step`` (last obs, hidden, prev action, mask) to 0, step=0."""
        s = self.step
        if s != 0:
            for buf in self.obs.values():
                buf[0].copy_(buf[s])
            self.hidden[0].copy_(self.hidden[s])
            self.prev_actions[0].copy_(self.prev_actions[s])
            self.masks[0].copy_(self.masks[s])
        self.step = 0
        self.returns_computed = False

    def to(self, device: torch.device | str) -> RolloutStorage:
        """Move every tensor to ``device`` (in place) and return ``self``."""
        self.device = torch.device(device)
        self.obs = {key: buf.to(self.device) for key, buf in self.obs.items()}
        for name in _STEP_TENSORS:
            setattr(self, name, getattr(self, name).to(self.device))
        self._make_host_views()
        return self

    def _live_rows(self, step: int) -> dict[str, tuple[Tensor, int]]:
        """Every buffer and how many of its leading rows hold data at ``step``: the observation-side buffers (and
        the values, whose last filled row is the bootstrap value) ``step + 1``, the per-step ones ``step``."""
        rows = {f"obs.{key}": (buf, step + 1) for key, buf in self.obs.items()}
        for name in _STEP_TENSORS:
            rows[name] = (getattr(self, name), step + 1 if name in _OBSERVATION_SIDE else step)
        return rows

    def state_dict(self) -> dict[str, Any]:
        """The live part of every buffer (``obs.<key>`` and the per-step tensors; see :meth:`_live_rows`), ``step``
        and ``returns_computed``, for exact resume. Between rollouts (step 0) that is what the next rollout starts
        from: its first observation, recurrent state, previous action and mask.

        Like :meth:`torch.nn.Module.state_dict` the tensors are views of the live buffers, not copies: save them
        (e.g. ``torch.save``) or clone them before the storage is filled again.
        """
        state: dict[str, Any] = {name: buf[:n] for name, (buf, n) in self._live_rows(self.step).items()}
        state["step"] = self.step
        state["returns_computed"] = self.returns_computed
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (copied into the leading rows of the existing buffers, so devices may
        differ).

        Raises ``KeyError`` on missing/unexpected keys and ``ValueError`` on a shape mismatch or invalid step.
        """
        expected = {f"obs.{key}" for key in self.obs} | set(_STEP_TENSORS) | {"step"}
        keys = set(state) - {"returns_computed"}
        if keys != expected:
            raise KeyError(
                f"state dict keys do not match: missing {sorted(expected - keys)}, "
                f"unexpected {sorted(keys - expected)}"
            )
        step = int(state["step"])
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"step {step} out of range [0, {self.num_steps}]")
        targets = self._live_rows(step)
        for name, (buf, n) in targets.items():
            if tuple(state[name].shape) != (n, *buf.shape[1:]):
                raise ValueError(
                    f"{name}: shape {tuple(state[name].shape)} does not match storage {(n, *buf.shape[1:])}"
                )
        for name, (buf, n) in targets.items():
            buf[:n].copy_(state[name])
        self.step = step
        self.returns_computed = bool(state.get("returns_computed", False))
