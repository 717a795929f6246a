"""A small three-conv CNN for fast CPU experiments (the quickstart's encoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddppo.policy.encoders.base import VisualEncoder, in_memory_format, init_conv_weights, trace_hw


def _simple_cnn_geometry(input_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """(kernel, stride) per conv layer, chosen from the smaller input side.

    The Nature-CNN geometry (8/4, 4/2, 3/1) needs >= 36 px; below 64 px it would leave a 1-2 px map, so
    smaller inputs get gentler kernels that keep a few pixels of spatial layout.
    """
    side = min(input_hw)
    if side >= 64:
        return [(8, 4), (4, 2), (3, 1)]
    if side >= 24:
        return [(4, 2), (3, 2), (3, 1)]
    return [(3, 1), (3, 1), (3, 1)]


class SimpleCNN(VisualEncoder):
    """Small three-conv CNN (Nature-CNN widths base, 2*base, base) for fast CPU experiments. Runs in channels-last
    memory: with no normalisation layers, a PPO minibatch learns faster so on the CPU (oneDNN) than in NCHW
    (bench/precision_probe.py --layouts); the flat features keep the NCHW order (C, H, W) whatever the layout."""

    def __init__(self, in_channels: int, input_hw: tuple[int, int], base_planes: int = 32):
        super().__init__()
        widths = [base_planes, 2 * base_planes, base_planes]
        geometry = _simple_cnn_geometry(input_hw)
        convs = []
        c_in = in_channels
        for (k, s), c_out in zip(geometry, widths):
            convs.append(nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=k, stride=s), nn.ReLU(inplace=True)))
            c_in = c_out
        self.layers = nn.ModuleList(convs)
        init_conv_weights(self)
        h, w = trace_hw(input_hw, [(k, s, 0, False) for k, s in geometry])
        self.output_shape = (widths[-1], h, w)
        self.output_size = widths[-1] * h * w

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(f"layers.{i}" for i in range(len(self.layers)))

    def stages(self, x: Tensor) -> list[Tensor]:
        outs = []
        x = in_memory_format(x, torch.channels_last)
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        # the layers as functions, not nine module calls, whose overhead is a large share of the forward pass at
        # rollout batch sizes; the same operations as stages()
        x = in_memory_format(x, torch.channels_last)
        for conv, _relu in self.layers:
            x = torch.relu_(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding))
        return torch.flatten(x, 1)


def simple_cnn(in_channels: int, input_hw: tuple[int, int], base_planes: int = 32, ngroups: int = 16,
               compression_groups: int = 0) -> SimpleCNN:
    del ngroups, compression_groups  # no normalisation layers, no compression layer
    return SimpleCNN(in_channels, input_hw, base_planes)
