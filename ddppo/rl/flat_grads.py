"""The gradients of a policy as views of one flat buffer.

A PPO minibatch zeroes, all-reduces (DD-PPO) and clips the gradients of every parameter. Done per parameter that
is one operation or more per tensor each time (torch's ``clip_grad_norm_`` alone computes a norm per tensor, the
norm of those norms and a scale per tensor; the old all-reduce concatenated the gradients and cloned them back);
with every gradient a view of one buffer each is a single operation, and the all-reduce needs no copies at all.
Autograd accumulates into an existing ``.grad`` in place, so the views stay the gradients across backward passes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["FlatGradients"]


class FlatGradients:
    """``param.grad`` of each parameter as a view of one flat buffer ``flat``.

    Anything that replaces a gradient (``zero_grad(set_to_none=True)``, a ``.grad = ...`` assignment) detaches it
    from the buffer; :meth:`zero_` attaches the views again, so call it before every backward pass (as a training
    step zeroes its gradients anyway).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = list(params)
        if not self.params:
            raise ValueError("FlatGradients needs at least one parameter")
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) > 1:
            raise ValueError(f"all parameters must share one dtype and device for a flat gradient buffer, got "
                             f"{sorted(str(k) for k in kinds)}")
        first = self.params[0]
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
        self.views: list[Tensor] = []
        offset = 0
        for p in self.params:
            self.views.append(self.flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.zero_()

    def zero_(self) -> None:
        """Zero every gradient (one fill of the buffer), re-attaching any gradient that was replaced."""
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                p.grad = view
        self.flat.zero_()

    def all_reduce_(self) -> None:
        """Sum the gradients over all ranks of the default process group: one collective on the buffer."""
        self._check_attached()
        dist.all_reduce(self.flat)

    def clip_norm_(self, max_norm: float) -> Tensor:
        """Scale the gradients so their global L2 norm is at most ``max_norm`` (``clip_grad_norm_``'s rule:
        ``min(1, max_norm / (norm + 1e-6))``); returns the norm before clipping. A NaN/Inf norm leaves it NaN/Inf
        for the caller to see."""
        self._check_attached()
        norm = torch.linalg.vector_norm(self.flat)
        self.flat.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def _check_attached(self) -> None:
        # a replaced gradient would silently drop out of the reduction and the clipping
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                raise RuntimeError("a parameter's gradient was replaced after FlatGradients.zero_(); zero the "
                                   "gradients through FlatGradients.zero_() before the backward pass")
