"""Per-channel running mean / variance normalisation of visual input (habitat's RunningMeanAndVar)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class RunningMeanAndVar(nn.Module):
    """Normalises [N, C, H, W] input by running per-channel mean and variance.

    In training mode each call first folds the batch's statistics into the running ones (Chan's parallel
    update, so the result equals the statistics of all data seen), then normalises with the updated values.
    In eval mode the statistics are frozen.

    The statistics are buffers (``mean`` and ``var`` [1, C, 1, 1], ``count`` = number of images seen) and
    therefore live in ``state_dict``. When ``sync_distributed`` is true and a default process group is
    initialised, each training-mode call all-reduces the batch statistics before the update, so every rank
    applies the same update and the buffers stay identical across ranks (equal to single-process training on
    the concatenated batch). That makes a training-mode forward a collective: every rank must make the same
    number of training-mode calls (keep the policy in ``eval()`` during rollouts, where DD-PPO's preemption
    makes ranks take different numbers of steps).
    """

    def __init__(self, n_channels: int, sync_distributed: bool = True, var_floor: float = 1e-2):
        super().__init__()
        self.n_channels = n_channels
        self.sync_distributed = sync_distributed
        # Floor on the variance used for scaling: a nearly constant channel (blank wall, empty room) would
        # otherwise be amplified into noise. Same value as habitat-baselines.
        self.var_floor = var_floor
        self.register_buffer("mean", torch.zeros(1, n_channels, 1, 1))
        self.register_buffer("var", torch.ones(1, n_channels, 1, 1))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def _should_sync(self) -> bool:
        return self.sync_distributed and dist.is_available() and dist.is_initialized()

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold the statistics of batch ``x`` [N, C, H, W] into the running mean and variance."""
        if x.dim() != 4 or x.shape[1] != self.n_channels:
            raise ValueError(f"expected [N, {self.n_channels}, H, W], got {tuple(x.shape)}")
        n, _, h, w = x.shape
        xd = x.detach()
        # Additive statistics (image count, sum of per-image means, sum of per-image mean squares) so that a
        # single all-reduce combines ranks exactly. Each image is summed in its own dtype (torch sums pairwise: a
        # relative error ~1e-7 for a camera image) and the images in float64; a float64 reduction over the whole
        # batch, or a float64 copy of it, costs several times as much
        per_image = torch.stack([xd.sum(dim=(2, 3)), (xd * xd).sum(dim=(2, 3))])  # [2, N, C]
        stats = torch.cat(
            [
                torch.tensor([float(n)], dtype=torch.float64, device=x.device),
                per_image.sum(dim=1, dtype=torch.float64).reshape(-1) / (h * w),
            ]
        )
        if self._should_sync():
            dist.all_reduce(stats)
            if stats[0].item() <= 0:
                return
        elif n == 0:
            return
        batch_n = stats[0]
        c = self.n_channels
        batch_mean = stats[1 : 1 + c] / batch_n
        batch_var = (stats[1 + c :] / batch_n - batch_mean * batch_mean).clamp_min(0.0)

        old_n = self.count.to(torch.float64)
        old_mean = self.mean.view(c).to(torch.float64)
        old_var = self.var.view(c).to(torch.float64)
        total = old_n + batch_n
        delta = batch_mean - old_mean
        new_mean = old_mean + delta * (batch_n / total)
        m2 = old_var * old_n + batch_var * batch_n + delta * delta * (old_n * batch_n / total)
        self.mean.copy_(new_mean.view(1, c, 1, 1).to(self.mean.dtype))
        self.var.copy_((m2 / total).view(1, c, 1, 1).to(self.var.dtype))
        self.count.copy_(total.to(self.count.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.update(x)
        inv_std = torch.rsqrt(self.var.clamp_min(self.var_floor)).to(x.dtype)
        return (x - self.mean.to(x.dtype)) * inv_std

    def extra_repr(self) -> str:
        return f"{self.n_channels}, sync_distributed={self.sync_distributed}, var_floor={self.var_floor}"
