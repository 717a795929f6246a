"""The visual encoders' contract (:class:`VisualEncoder`), and the pieces they share: the ~2048-feature compression
head, output-size arithmetic, memory formats and initial weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Habitat-baselines compresses the last feature map to roughly this many flat features before the FC.
COMPRESSED_FLAT_SIZE = 2048


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, ceil_mode: bool = False) -> int:
    """Output length of a convolution / pooling along one axis (PyTorch's rules, dilation 1)."""
    span = size + 2 * padding - kernel
    if span < 0:
        return 0
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # PyTorch drops a ceil-mode window that would start entirely in the right padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def trace_hw(input_hw: tuple[int, int], ops: list[tuple[int, int, int, bool]]) -> tuple[int, int]:
    """Spatial size after a chain of (kernel, stride, padding, ceil_mode) ops; ValueError if it vanishes.

    Computed in closed form rather than by a dry run so that building an encoder costs no forward pass.
    """
    h, w = input_hw
    for k, s, p, ceil in ops:
        h, w = conv_output_size(h, k, s, p, ceil), conv_output_size(w, k, s, p, ceil)
        if h < 1 or w < 1:
            raise ValueError(f"input of size {tuple(input_hw)} is too small for this encoder")
    return h, w


def in_memory_format(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``x`` [B, C, H, W] with exactly the strides of ``memory_format`` (contiguous_format or channels_last), copied
    only if it has others. ``Tensor.contiguous(memory_format=...)`` does not do this: with one channel both layouts
    count as contiguous, yet the convolutions pick their kernels (and GroupNorm its path) by the actual strides."""
    b, c, h, w = x.shape
    want = (c * h * w, 1, w * c, c) if memory_format == torch.channels_last else (c * h * w, h * w, w, 1)
    return x if x.stride() == want else x.clone(memory_format=memory_format)


def compression_channels(out_hw: tuple[int, int], flat_size: int = COMPRESSED_FLAT_SIZE) -> int:
    return max(1, round(flat_size / (out_hw[0] * out_hw[1])))


def group_norm(ngroups: int, channels: int) -> nn.GroupNorm:
    """GroupNorm that falls back to the largest group count dividing ``channels``.

    The compression width is derived from the input size (e.g. 228 channels for a 3x3 map), so it need not
    be a multiple of the configured group count.
    """
    return nn.GroupNorm(math.gcd(max(1, ngroups), channels), channels)


def compression_block(in_channels: int, out_channels: int, ngroups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        group_norm(ngroups, out_channels),
        nn.ReLU(inplace=True),
    )


def init_conv_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisualEncoder(nn.Module):
    """What every visual encoder is, and all the policy and the representation analysis rely on:

    - ``forward(x)``: a normalised channels-first float batch ``[B, C, H, W]`` to flat features ``[B, output_size]``;
    - ``output_size`` (int) and ``output_shape`` (``(channels, height, width)`` of the last map, flattened by
      ``forward``), known when the encoder is built, without a forward pass;
    - ``stages(x)``: the activations after each stage, in order, the last one ``forward``'s map before flattening
      (``ddppo compare-reps`` compares them layer by layer), and ``stage_names``, the submodule that produces each.

    Constructors (ddppo.policy.encoders.ENCODERS) take ``(in_channels, input_hw, base_planes, ngroups,
    compression_groups)``; submodule names are part of checkpoints, so they stay as they are."""

    output_size: int
    output_shape: tuple[int, int, int]

    @property
    def stage_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def stages(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError


class StagedEncoder(VisualEncoder):
    """An encoder made of ``stem``, ``layers`` (a ModuleList of stages) and ``compression``, each a stage of
    ``stages()`` for representation analysis; ``forward`` flattens the compressed map. Runs in plain NCHW memory:
    with channels-last input (a one-channel depth image permuted from [B, H, W, 1] has its strides) a ResNet18 PPO
    minibatch learns markedly slower in bf16 on the CPU (GroupNorm's channels-last path; float32: within noise;
    bench/precision_probe.py --layouts measures it)."""

    def finish(self, backbone_channels: int, out_hw: tuple[int, int], ngroups: int) -> None:
        """Add the compression head for a backbone ending in ``backbone_channels`` x ``out_hw``."""
        channels = compression_channels(out_hw)
        self.compression = compression_block(backbone_channels, channels, ngroups)
        init_conv_weights(self.compression)
        self.output_shape = (channels, *out_hw)
        self.output_size = channels * out_hw[0] * out_hw[1]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return ("stem", *(f"layers.{i}" for i in range(len(self.layers))), "compression")

    def stages(self, x: Tensor) -> list[Tensor]:
        outs = [self.stem(in_memory_format(x, torch.contiguous_format))]
        for layer in self.layers:
            outs.append(layer(outs[-1]))
        outs.append(self.compression(outs[-1]))
        return outs

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(in_memory_format(x, torch.contiguous_format))
        for layer in self.layers:
            x = layer(x)
        return torch.flatten(self.compression(x), 1)
