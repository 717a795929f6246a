"""GroupNorm ResNets at half width (base planes 32), the DD-PPO PointNav visual backbones.

BatchNorm is replaced by GroupNorm because RL batches are correlated and small per worker, and the running
statistics of BatchNorm would differ between rollout (eval) and update (train) passes.
"""

from __future__ import annotations

from torch import Tensor, nn

from ddppo.policy.encoders.base import (
    StagedEncoder,
    init_conv_weights,
    trace_hw,
)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, ngroups: int, stride: int = 1, cardinality: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.branch = nn.Sequential(
            _conv3x3(inplanes, planes, stride, groups=cardinality),
            nn.GroupNorm(ngroups, planes),
            nn.ReLU(inplace=True),
            _conv3x3(planes, out, groups=cardinality),
            nn.GroupNorm(ngroups, out),
        )
        self.shortcut = _shortcut(inplanes, out, stride, ngroups)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand; optional squeeze-excitation on the branch."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        ngroups: int,
        stride: int = 1,
        cardinality: int = 1,
        use_se: bool = False,
    ):
        super().__init__()
        out = planes * self.expansion
        layers: list[nn.Module] = [
            _conv1x1(inplanes, planes),
            nn.GroupNorm(ngroups, planes),
            nn.ReLU(inplace=True),
            _conv3x3(planes, planes, stride, groups=cardinality),
            nn.GroupNorm(ngroups, planes),
            nn.ReLU(inplace=True),
            _conv1x1(planes, out),
            nn.GroupNorm(ngroups, out),
        ]
        if use_se:
            layers.append(SqueezeExcite(out))
        self.branch = nn.Sequential(*layers)
        self.shortcut = _shortcut(inplanes, out, stride, ngroups)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class SEResNeXtBottleneck(Bottleneck):
    """ResNeXt bottleneck (expansion 2, grouped 3x3) with squeeze-excitation, as in se_resneXt50."""

    expansion = 2

    def __init__(self, inplanes: int, planes: int, ngroups: int, stride: int = 1, cardinality: int = 1):
        super().__init__(inplanes, planes, ngroups, stride=stride, cardinality=cardinality, use_se=True)


class SqueezeExcite(nn.Module):
    """Channel re-weighting from globally pooled features.

    Reduction 4 rather than the SE paper's 16: at half width the bottleneck would otherwise be only a few
    units wide.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


def _shortcut(inplanes: int, out: int, stride: int, ngroups: int) -> nn.Module:
    if stride == 1 and inplanes == out:
        return nn.Identity()
    return nn.Sequential(_conv1x1(inplanes, out, stride), nn.GroupNorm(ngroups, out))


class ResNetEncoder(StagedEncoder):
    """GroupNorm ResNet backbone + compression conv; maps [B, C, H, W] to [B, output_size] (~2048).

    ``stages(x)`` returns the activations after the stem, each of the four residual stages and the
    compression layer, for representation analysis.
    """

    def __init__(
        self,
        in_channels: int,
        input_hw: tuple[int, int],
        block: type[nn.Module],
        layers: list[int],
        base_planes: int = 32,
        ngroups: int = 16,
        cardinality: int = 1,
        compression_groups: int = 0,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, base_planes, kernel_size=7, stride=2, padding=3, bias=False),
            nn.GroupNorm(ngroups, base_planes),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        inplanes = base_planes
        stage_list = []
        for i, depth in enumerate(layers):
            planes = base_planes * (2**i)
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(block(inplanes, planes, ngroups, stride=stride if j == 0 else 1, cardinality=cardinality))
                inplanes = planes * block.expansion
            stage_list.append(nn.Sequential(*blocks))
        self.layers = nn.ModuleList(stage_list)
        init_conv_weights(self)

        # Stem conv 7/2/3 and maxpool 3/2/1, then the first block of stages 2-4 strides a 3x3 conv (pad 1).
        ops = [(7, 2, 3, False), (3, 2, 1, False)] + [(3, 2, 1, False)] * (len(layers) - 1)
        self.finish(inplanes, trace_hw(input_hw, ops), compression_groups or ngroups)


def _check_groups(base_planes: int, ngroups: int) -> None:
    if base_planes % ngroups != 0:
        raise ValueError(f"base_planes ({base_planes}) must be divisible by ngroups ({ngroups})")


def resnet18(in_channels: int, input_hw: tuple[int, int], base_planes: int = 32, ngroups: int = 16,
             compression_groups: int = 0) -> ResNetEncoder:
    _check_groups(base_planes, ngroups)
    return ResNetEncoder(in_channels, input_hw, BasicBlock, [2, 2, 2, 2], base_planes, ngroups,
                         compression_groups=compression_groups)


def resnet50(in_channels: int, input_hw: tuple[int, int], base_planes: int = 32, ngroups: int = 16,
             compression_groups: int = 0) -> ResNetEncoder:
    """habitat-baselines' resnet50 at half width: Bottleneck stages [3, 4, 6, 3], GroupNorm everywhere."""
    _check_groups(base_planes, ngroups)
    return ResNetEncoder(in_channels, input_hw, Bottleneck, [3, 4, 6, 3], base_planes, ngroups,
                         compression_groups=compression_groups)


def se_resnext50(in_channels: int, input_hw: tuple[int, int], base_planes: int = 32, ngroups: int = 16,
                 compression_groups: int = 0) -> ResNetEncoder:
    _check_groups(base_planes, ngroups)
    # Cardinality base_planes/2 follows habitat-baselines; it keeps 2 channels per group in the first stage.
    return ResNetEncoder(
        in_channels,
        input_hw,
        SEResNeXtBottleneck,
        [3, 4, 6, 3],
        base_planes,
        ngroups,
        cardinality=max(1, base_planes // 2),
        compression_groups=compression_groups,
    )
