"""SqueezeNet 1.1 (the transfer paper's second encoder family) with the compression head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddppo.policy.encoders.base import StagedEncoder, init_conv_weights, trace_hw


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


def squeezenet1_1(in_channels: int, input_hw: tuple[int, int], base_planes: int = 32, ngroups: int = 16,
                  compression_groups: int = 0) -> SqueezeNetEncoder:
    del base_planes  # SqueezeNet keeps its published widths
    return SqueezeNetEncoder(in_channels, input_hw, ngroups, compression_groups)
