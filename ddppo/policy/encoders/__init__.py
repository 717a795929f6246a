"""Visual encoders: one contract (:class:`VisualEncoder` in ``base``: forward to flat features, ``output_size``,
``stages`` and ``stage_names`` for representation analysis), a registry of their constructors by ``policy.encoder``
name, and the one check of that name (:func:`encoder_constructor`), which the config, the policy and
:func:`make_encoder` all use.

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
    "encoder_constructor",
    "make_encoder",
]


ENCODERS: dict[str, Callable[..., VisualEncoder]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "se_resneXt50": se_resnext50,
    "squeezenet1_1": squeezenet1_1,
    "simple_cnn": simple_cnn,
}


def encoder_constructor(name: str, key: str = "policy.encoder") -> Callable[..., VisualEncoder]:
    """The constructor registered under ``name``; a one-line ValueError naming ``key`` and the choices otherwise."""
    if name not in ENCODERS:
        raise ValueError(f"{key}={name!r}: unknown encoder; use one of {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name]


def make_encoder(
    name: str, in_channels: int, input_hw: tuple[int, int], base_planes: int = 32, ngroups: int = 16,
    compression_groups: int = 0,
) -> VisualEncoder:
    """Build the encoder registered under ``name`` (see :func:`encoder_constructor`)."""
    return encoder_constructor(name)(in_channels, tuple(input_hw), base_planes, ngroups, compression_groups)
