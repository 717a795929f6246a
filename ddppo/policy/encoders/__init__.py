"""Visual encoders: one contract (:class:`VisualEncoder` in ``base``: forward to flat features, ``output_size``,
``stages`` and ``stage_names`` for representation analysis), and a registry of their constructors by ``policy.encoder``
name (the config's Encoder choice, validated when the config loads; tests/test_policy.py checks the two agree).

Constructors in ``ENCODERS`` share the signature ``(in_channels, input_hw, base_planes, ngroups, compression_groups)``
(``compression_groups``: the compression layer's GroupNorm groups, 0 = ``ngroups``; ignored without one).
"""

from __future__ import annotations

from collections.abc import Callable

from ddppo.policy.encoders.base import StagedEncoder, VisualEncoder
from ddppo.policy.encoders.resnet import ResNetEncoder, resnet18, resnet50, se_resnext50
from ddppo.policy.encoders.small_cnn import SimpleCNN, simple_cnn
from ddppo.policy.encoders.squeezenet import SqueezeNetEncoder, squeezenet1_1

__all__ = [
    "ENCODERS",
    "ResNetEncoder",
    "SimpleCNN",
    "SqueezeNetEncoder",
    "StagedEncoder",
    "VisualEncoder",
    "make_encoder",
]


ENCODERS: dict[str, Callable[..., VisualEncoder]] = {  # keyed by ddppo.config.Encoder's names
    "resnet18": resnet18,
    "resnet50": resnet50,
    "se_resneXt50": se_resnext50,
    "squeezenet1_1": squeezenet1_1,
    "simple_cnn": simple_cnn,
}


def make_encoder(
    name: str, in_channels: int, input_hw: tuple[int, int], base_planes: int = 32, ngroups: int = 16,
    compression_groups: int = 0,
) -> VisualEncoder:
    """Build the encoder registered under ``name`` (a ``policy.encoder`` the config validated)."""
    return ENCODERS[name](in_channels, tuple(input_hw), base_planes, ngroups, compression_groups)
