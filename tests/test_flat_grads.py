"""FlatGradients: gradients as views of one buffer, zeroed, clipped (and all-reduced, see test_distributed.py) as one.

Checked against torch's own per-parameter machinery (``torch.autograd.grad``, ``clip_grad_norm_``) on a copy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ddppo.rl.flat_grads import FlatGradients
from ddppo.rl.ppo import make_adam


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def loss_of(net: nn.Module, scale: float = 1.0) -> torch.Tensor:
    x = torch.linspace(-2, 2, 20).reshape(4, 5)
    return scale * (net(x) ** 2).sum()


def test_gradients_accumulate_into_the_buffer_over_backward_passes():
    net = small_net()
    grads = FlatGradients(net.parameters())
    reference = torch.autograd.grad(loss_of(net), list(net.parameters()))
    for _ in range(3):  # a training loop: zero, backward, the views stay the gradients
        grads.zero_()
        loss_of(net).backward()
        for p, view, ref in zip(net.parameters(), grads.views, reference):
            assert p.grad is view
            torch.testing.assert_close(p.grad, ref)
    torch.testing.assert_close(grads.flat, torch.cat([r.reshape(-1) for r in reference]))


def test_clip_norm_matches_clip_grad_norm():
    net = small_net()
    twin = copy.deepcopy(net)
    grads = FlatGradients(net.parameters())
    grads.zero_()
    loss_of(net, 10.0).backward()
    loss_of(twin, 10.0).backward()
    expected_norm = nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    norm = grads.clip_norm_(0.5)
    torch.testing.assert_close(norm, expected_norm)
    assert norm > 0.5  # the case where clipping scales
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(torch.linalg.vector_norm(grads.flat), torch.tensor(0.5), rtol=1e-5, atol=0)


def test_clip_norm_leaves_small_gradients_alone_and_reports_inf():
    net = small_net()
    grads = FlatGradients(net.parameters())
    grads.zero_()
    loss_of(net, 1e-3).backward()
    before = grads.flat.clone()
    norm = grads.clip_norm_(1e6)
    assert torch.equal(grads.flat, before)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(before))
    grads.views[0][0, 0] = float("inf")
    assert not torch.isfinite(grads.clip_norm_(1.0))


def test_replaced_gradients_are_reattached_or_refused():
    net = small_net()
    grads = FlatGradients(net.parameters())
    optimizer = make_adam(net.parameters(), lr=1e-3, eps=1e-5)
    optimizer.zero_grad()  # set_to_none=True: the views are gone
    assert all(p.grad is None for p in net.parameters())
    grads.zero_()
    loss_of(net).backward()
    assert all(p.grad is v for p, v in zip(net.parameters(), grads.views))
    optimizer.step()  # the optimiser steps on the views

    first = next(net.parameters())
    first.grad = torch.ones_like(first)  # a gradient the buffer does not hold
    with pytest.raises(RuntimeError, match="FlatGradients.zero_"):
        grads.clip_norm_(1.0)


def test_unused_parameter_keeps_a_zero_gradient():
    net = small_net()
    extra = nn.Parameter(torch.ones(4))
    grads = FlatGradients([*net.parameters(), extra])
    grads.zero_()
    loss_of(net).backward()
    assert extra.grad is grads.views[-1] and torch.equal(extra.grad, torch.zeros(4))


def test_bad_parameter_lists_fail_in_one_line():
    with pytest.raises(ValueError, match="at least one parameter"):
        FlatGradients([])
    mixed = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    with pytest.raises(ValueError, match="one dtype and device"):
        FlatGradients(mixed)
