"""Building blocks: RMSNorm, rotary embeddings, and linears whose weights one TP rank holds.

Numerics follow transformers' Llama code step for step (float32 norm statistics, cos/sin from
float32 positions times float32 inverse frequencies) so greedy output matches it token for token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.config import ModelConfig
from pdserve.engine.parallel import TPGroup
from pdserve.engine.quant_linear import QuantizedWeight, quantized_weight
from pdserve.engine.quantization import QuantSpec


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Weights are filled by the loader, so skip initialisation (slow for big models).
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, statistics in float32."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(input_dtype)


class Linear(nn.Module):
    """y = x W^T + b with W: [out_local, in_local]; column-parallel when out is a shard.

    With a QuantSpec, W lives in `qweight` (engine/quant_linear.py) and `weight` is None; the
    loader hands `load_quantized` this rank's float shard. The bias stays in the model's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        quant: QuantSpec | None = None,
        name: str = "linear",
    ) -> None:
        super().__init__()
        self.weight, self.qweight = _weight(out_features, in_features, dtype, quant, name)
        self.bias = empty_param(out_features, dtype=dtype) if bias else None

    def load_quantized(self, w: torch.Tensor) -> None:
        """Quantize this rank's float weight [out_local, in] into qweight."""
        assert self.qweight is not None
        self.qweight.load(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            y = self.qweight(x)
            return y if self.bias is None else y + self.bias
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input dimension sharded: partial products are summed across ranks, then the bias added once.

    Quantized (see Linear), each rank quantizes only its own input columns: int4 groups never
    cross the shard boundary (quantization.int4_group), and an int8 row's scale is its max over
    every rank's columns, so each rank holds exactly its slice of the TP 1 codes.
    """

    def __init__(
        self,
        in_local: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        tp: TPGroup,
        quant: QuantSpec | None = None,
        name: str = "linear",
    ) -> None:
        super().__init__()
        self.weight, self.qweight = _weight(out_features, in_local, dtype, quant, name)
        self.bias = empty_param(out_features, dtype=dtype) if bias else None
        self.tp = tp

    def load_quantized(self, w: torch.Tensor) -> None:
        """Quantize this rank's float weight [out, in_local]; a row's int8 scale spans all ranks."""
        assert self.qweight is not None
        self.qweight.load(w, self.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            partial = self.qweight(x)
        else:
            assert self.weight is not None
            partial = F.linear(x, self.weight)
        y = self.tp.all_reduce(partial)
        return y if self.bias is None else y + self.bias


def _weight(
    out_features: int, in_features: int, dtype: torch.dtype, quant: QuantSpec | None, name: str
) -> tuple[nn.Parameter | None, QuantizedWeight | None]:
    if quant is None:
        return empty_param(out_features, in_features, dtype=dtype), None
    return None, quantized_weight(quant, out_features, in_features, dtype, name)


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] (float32) and the cos/sin scale for the RoPE variant."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling_dict
    if scaling is None:
        return inv_freq, 1.0
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    assert rope_type == "yarn", rope_type  # config.py rejects the others
    return _yarn_inv_freq(config, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(config: ModelConfig, s: dict) -> tuple[torch.Tensor, float]:
    dim, base = config.head_dim, config.rope_theta
    factor = s["factor"]
    orig_len = s["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = (
            mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        )

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of one forward pass (computed per call: cheap, exact)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, signed sin: [T, 1, head_dim], as apply_rope takes them."""
        freqs = positions[:, None].float() * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        half = freqs.shape[-1]
        # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]: one roll instead of
        # slice, slice, neg, cat per call, bit for bit the same result.
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos, signed_sin: [T, 1, head_dim] (HF rotate-half layout)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
