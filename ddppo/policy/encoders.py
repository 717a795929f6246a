"""Visual encoders and their registry.

Every encoder takes a normalised channels-first float tensor [B, C, H, W] and returns flat features
[B, output_size]; ``stages(x)`` returns the intermediate activations (one per stage) for analysis.
Constructors in ``ENCODERS`` share the signature ``(in_channels, input_hw, base_planes, ngroups, compression_groups)``
(``compression_groups``: the compression layer's GroupNorm groups, 0 = ``ngroups``; ignored without one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddppo.policy.common import (
    StagedEncoder,
    in_memory_format,
    init_conv_weights,
    trace_hw,
)
from ddppo.policy.resnet import ResNetEncoder, resnet18, resnet50, se_resnext50

__all__ = [
    "ENCODERS",
    "ResNetEncoder",
    "SimpleCNN",
    "SqueezeNetEncoder",
    "make_encoder",
    "resnet18",
    "resnet50",
    "se_resnext50",
    "simple_cnn",
    "squeezenet1_1",
]


class Fire(nn.Module):
    """SqueezeNet fire module: 1x1 squeeze, then parallel 1x1 and 3x3 expands concatenated."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(inplanes, squeeze, 1), nn.ReLU(inplace=True))
        self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand1x1, 1), nn.ReLU(inplace=True))
        self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand3x3, 3, padding=1), nn.ReLU(inplace=True))
        self.out_channels = expand1x1 + expand3x3

    def forward(self, x: Tensor) -> Tensor:
        s = self.squeeze(x)
        return torch.cat([self.expand1x1(s), self.expand3x3(s)], 1)


class SqueezeNetEncoder(StagedEncoder):
    """SqueezeNet 1.1 feature extractor followed by a compression conv to ~2048 flat features.

    Widths are those of SqueezeNet 1.1 (the transfer paper's second encoder family); ``ngroups`` only
    affects the GroupNorm of the compression layer.
    """

    def __init__(self, in_channels: int, input_hw: tuple[int, int], ngroups: int = 16, compression_groups: int = 0):
        super().__init__()

        def pool() -> nn.MaxPool2d:
            return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)

        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True))
        self.layers = nn.ModuleList(
            [
                nn.Sequential(pool(), Fire(64, 16, 64, 64), Fire(128, 16, 64, 64)),
                nn.Sequential(pool(), Fire(128, 32, 128, 128), Fire(256, 32, 128, 128)),
                nn.Sequential(
                    pool(),
                    Fire(256, 48, 192, 192),
                    Fire(384, 48, 192, 192),
                    Fire(384, 64, 256, 256),
                    Fire(512, 64, 256, 256),
                ),
            ]
        )
        init_conv_weights(self)
        self.finish(512, trace_hw(input_hw, [(3, 2, 0, False)] + [(3, 2, 0, True)] * 3),
                    compression_groups or ngroups)


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


class SimpleCNN(nn.Module):
    """Small three-conv CNN (Nature-CNN widths base, 2*base, base) for fast CPU experiments. Runs in channels-last
    memory: with no normalisation layers, a PPO minibatch learns up to 1.1x faster so on the CPU (oneDNN) than in
    NCHW (bench/precision_probe.py --layouts); the flat features keep the NCHW order (C, H, W) whatever the layout."""

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

    def stages(self, x: Tensor) -> list[Tensor]:
        outs = []
        x = in_memory_format(x, torch.channels_last)
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        # the layers as functions, not nine module calls (~15 us each with their Sequential: ~15% of the forward
        # pass at rollout batch sizes); the same operations as stages()
        x = in_memory_format(x, torch.channels_last)
        for conv, _relu in self.layers:
            x = torch.relu_(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding))
        return torch.flatten(x, 1)


def squeezenet1_1(in_channels: int, input_hw: tuple[int, int], base_planes: int = 32, ngroups: int = 16,
                  compression_groups: int = 0):
    del base_planes  # SqueezeNet keeps its published widths
    return SqueezeNetEncoder(in_channels, input_hw, ngroups, compression_groups)


def simple_cnn(in_channels: int, input_hw: tuple[int, int], base_planes: int = 32, ngroups: int = 16,
               compression_groups: int = 0):
    del ngroups, compression_groups  # no normalisation layers, no compression layer
    return SimpleCNN(in_channels, input_hw, base_planes)


ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "se_resneXt50": se_resnext50,
    "squeezenet1_1": squeezenet1_1,
    "simple_cnn": simple_cnn,
}


def make_encoder(
    name: str, in_channels: int, input_hw: tuple[int, int], base_planes: int = 32, ngroups: int = 16,
    compression_groups: int = 0,
) -> nn.Module:
    """Build the encoder registered under ``name``; unknown names raise ValueError listing the choices."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name](in_channels, tuple(input_hw), base_planes, ngroups, compression_groups)
