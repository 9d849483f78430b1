"""The s8 scheme in pure PyTorch, bit-compatible with the C++ kernels.

This is the numerics of ``include/qsparseprop/quantization.hpp`` written with
torch operations, used by the ``prototype=True`` modules (accuracy studies
without the kernels) and by the tests as an independent model. Integer sums
are done in float64, which is exact for every reduction below 2**53 / 127**2
terms, so the results match the kernels' int64 sums bit for bit.
"""

from __future__ import annotations

import torch

QUANT_MAX = 127
_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (wraparound emulated)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def rounding_seed32(seed: int) -> int:
    """The 32-bit stream key of a 64-bit seed (``qsp::rounding_seed32``)."""
    seed &= (1 << 64) - 1
    return _mix32_int((seed & _MASK32) ^ _mix32_int(((seed >> 32) + 0x9E3779B9) & _MASK32))


def rounding_noise(key: int, numel: int) -> torch.Tensor:
    """The 16-bit integer noise of elements 0..numel-1 in stream ``key``
    (``qsp::stochastic_rounding_noise``): half of one hash of (i, the key
    without bit 0), the high half when the key's bit 0 is set."""
    idx = torch.arange(numel, dtype=torch.int64) & _MASK32
    h = _mix32(idx ^ (key & _MASK32 & ~1))
    return h >> 16 if key & 1 else h & 0xFFFF


def _scale_of(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scale = amax / 127 (NaN when amax is not finite) and its usable inverse."""
    scale = torch.where(torch.isfinite(amax), amax / QUANT_MAX, torch.full_like(amax, float("nan")))
    # a subnormal scale whose inverse overflows is not usable (C++: quant_scale_from_abs_max)
    usable = torch.isfinite(scale) & (scale > 0) & torch.isfinite(1.0 / scale)
    inv = torch.where(usable, 1.0 / torch.where(usable, scale, torch.ones_like(scale)), 0.0)
    return scale, inv


def _abs_max(x: torch.Tensor, dim=None) -> torch.Tensor:
    a = x.abs()
    return a.amax() if dim is None else a.amax(dim=dim)


def quantize_rne(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor round-half-even int8 (as float tensor of integers) and scale."""
    scale, inv = _scale_of(_abs_max(x.float()))
    q = torch.round(x.float() * inv).clamp_(-QUANT_MAX, QUANT_MAX)
    return q, scale


def quantize_weight_rows(w_dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (dim 0) symmetric int8 of a dense weight (zeros outside the pattern)."""
    flat = w_dense.reshape(w_dense.shape[0], -1).float()
    scale, inv = _scale_of(_abs_max(flat, dim=1))
    q = torch.round(flat * inv[:, None]).clamp_(-QUANT_MAX, QUANT_MAX)
    return q.reshape(w_dense.shape), scale


def quantize_stochastic(
    x: torch.Tensor, key: int, channel_multiplier: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic rounding of v = x * multiplier[channel] (channel = dim 1), per
    tensor, in stream ``key`` (``qsp::stochastic_round``): t = v / scale
    clamped to +-127, q = floor((rne(t * 2**16) + noise) / 2**16)."""
    v = x.float()
    if channel_multiplier is not None:
        shape = [1, -1] + [1] * (v.dim() - 2)
        v = v * channel_multiplier.reshape(shape)
    scale, inv = _scale_of(_abs_max(v))
    noise = rounding_noise(key, v.numel()).reshape(v.shape)
    # an unusable scale (inv 0) quantizes to zeros, also where v is NaN or infinite
    t = torch.where(inv != 0, v * inv, 0.0).clamp_(-QUANT_MAX, QUANT_MAX)
    fixed = torch.round(t * 65536.0).to(torch.int64)  # round half to even, exact in int64
    q = torch.div(fixed + noise, 65536, rounding_mode="floor").to(torch.float32)
    return q, scale


def gradient_keys(seed: int) -> tuple[int, int]:
    """The rounding streams of a step's two gradient copies, (for dW, for dX):
    one key, bit 0 apart (``qsp::detail::s8::dw_stream`` / ``dx_stream``)."""
    key = rounding_seed32(seed)
    return key & ~1, key | 1
