"""What the visual encoder computes in: ``policy.encoder_precision`` (float32 | bfloat16 | auto).

bf16 runs under torch.autocast, so the weights, their gradients and everything outside the encoder stay float32.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


def has_native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic in hardware (oneDNN on AVX512-BF16 or AMX; CUDA tensor cores): there,
    large bf16 convolutions run up to about twice as fast as float32 ones; elsewhere bf16 is emulated and slower."""
    if device.type == "cuda":  # bf16 tensor cores from Ampere (compute capability 8) on
        return torch.cuda.get_device_properties(device).major >= 8
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))
    return False


@functools.cache
def resolve_encoder_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the encoder computes in on ``device`` for ``policy.encoder_precision`` (float32, bfloat16, or auto:
    bfloat16 where the hardware has it). Cached: the hardware probes cost more than a small layer, and the answer
    never changes."""
    if precision == "auto":
        return torch.bfloat16 if has_native_bfloat16(device) else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def encode(encoder: nn.Module, x: Tensor, precision: str) -> Tensor:
    """``encoder(x)`` as float32 features, computed in the dtype ``precision`` gives on x's device. bf16 runs under
    torch.autocast: the convolutions compute in bf16 while the weights and their gradients stay float32."""
    dtype = resolve_encoder_dtype(precision, x.device)
    if dtype == torch.float32:
        return encoder(x)
    with torch.autocast(x.device.type, dtype=dtype):
        features = encoder(x)
    return features.float()
