"""Run a recurrent core over a rollout with episode resets as ONE packed RNN call.

A rollout ``[T, N]`` whose environments start new episodes at different steps is cut into episode segments:
each environment's steps from one episode start to the next. Every segment becomes one sequence of a
``PackedSequence``; its initial state is the rollout's stored state for an environment's first segment (zeroed if
that step starts an episode) and zeros for every later one. The RNN then runs over all segments in one call
instead of being split at every step where any environment resets: early in training, when almost every step
has a reset somewhere, that was one RNN call per step (habitat-lab packs its rollouts the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence


@dataclass(frozen=True)
class EpisodeSegments:
    """Where the episode segments of a ``[T, N]`` rollout lie, longest segment first (packing order).

    ``order`` [T*N]: flat rollout index (t * N + n) of each packed row; ``inverse`` its inverse permutation;
    ``batch_sizes`` [longest segment]: segments still running at each packed step (on the CPU, as ``PackedSequence``
    needs it); ``env`` [S]: environment of each segment; ``keep_state`` [S]: 1 where the segment continues the
    stored state, 0 where it starts from zeros; ``last`` [N]: the segment that ends each environment's rollout.
    """

    order: Tensor
    inverse: Tensor
    batch_sizes: Tensor
    env: Tensor
    keep_state: Tensor
    last: Tensor


def episode_segments(masks: Tensor) -> EpisodeSegments:
    """Segments of a rollout from its masks ``[T, N]`` (False / 0 where a step starts a new episode)."""
    m = masks.detach().to("cpu", torch.bool).numpy()
    t_len, n = m.shape
    starts = ~m
    starts[0] = True  # every environment's first step opens a segment, reset or not
    env, t0 = np.nonzero(starts.T)  # by environment, then time
    end = np.full(len(env), t_len)
    same_env = env[1:] == env[:-1]
    end[:-1][same_env] = t0[1:][same_env]
    length = end - t0
    by_length = np.argsort(-length, kind="stable")
    env, t0, length = env[by_length], t0[by_length], length[by_length]
    step = np.arange(length[0])[:, None]
    running = step < length[None, :]  # [L, S]: packed step k of segment s exists; a prefix of each row
    order = ((t0[None, :] + step) * n + env[None, :])[running]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    last = np.empty(n, dtype=np.int64)
    ends_rollout = np.nonzero(t0 + length == t_len)[0]
    last[env[ends_rollout]] = ends_rollout
    keep = (t0 == 0) & m[0, env]
    return EpisodeSegments(
        order=torch.from_numpy(order),
        inverse=torch.from_numpy(inverse),
        batch_sizes=torch.from_numpy(running.sum(1).astype(np.int64)),
        env=torch.from_numpy(env.astype(np.int64)),
        keep_state=torch.from_numpy(keep.astype(np.float32)),
        last=torch.from_numpy(last),
    )


def run_packed(rnn, x: Tensor, hidden: Tensor, segments: EpisodeSegments) -> tuple[Tensor, Tensor]:
    """``rnn(packed, state) -> (packed_out, state)`` over ``x`` [T, N, D] from ``hidden`` [L, N, H] (the state
    before step 0). Returns the outputs [T, N, H'] and the state after the last step [L, N, H], as running the RNN
    step by step with the state zeroed at every episode start would."""
    t_len, n = x.shape[:2]
    device = x.device
    seg = segments
    state = hidden.index_select(1, seg.env.to(device)) * seg.keep_state.to(device, hidden.dtype).view(1, -1, 1)
    data = x.reshape(t_len * n, -1).index_select(0, seg.order.to(device))
    out, state = rnn(PackedSequence(data, seg.batch_sizes), state)
    outputs = out.data.index_select(0, seg.inverse.to(device)).view(t_len, n, -1)
    return outputs, state.index_select(1, seg.last.to(device))
