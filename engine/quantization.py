"""Weight-only quantization: the schemes, their round trips, and the int4 nibble layout.

int8 is symmetric per output row: w ~= q * scale[row], q in [-127, 127]. With 255 levels a zero
point buys nothing, and torch's fused CPU kernel (`_weight_int8pack_mm`) takes exactly this.

int4 is asymmetric per group of `group` input columns: w ~= (q - 8) * scale + zero, q in [0, 15],
scale = (max - min) / 15 and zero = the value of code 8. With only 16 levels, fitting each
group's own [min, max] (rather than +-absmax) spends no level on a side the group does not
use, and it is the layout torch's int4 kernels take (`scales_and_zeros`, tinygemm's format).

Scales and zeros are stored in the dtype the layer computes in (bfloat16 on CPU), so every path
(fused kernel or dequantize-then-matmul) multiplies by the same numbers. Codes are rounded
against the stored scale and zero, so a weight is within half a step of its code; only at a
range's ends can the stored values' rounding (2^-8 relative in bf16) add up to 2^-8 (|zero| +
8 scale) for int4 (int8's largest weight still rounds to 127).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from pdserve.engine.config import ModelLoadError

SCHEMES = ("none", "int8", "int4")
# 32, llama.cpp's block: re-quantizing a GGUF's Q4_0/Q4_1/Q4_K weights (the default SmolLM2 is
# Q4_1) on their own grid nearly recovers them (SmolLM2's linears: 0.4% relative weight error
# against 8% with groups of 64), the fused kernel runs as fast as at 64, and 32 divides more TP
# shard widths. It costs 1/16 byte a weight more than 64 (bf16 scale and zero per group).
DEFAULT_INT4_GROUP = 32
MIN_INT4_GROUP = 16  # below this, scales and zeros cost over a quarter of the int4 bytes
_INT4_NAME = re.compile(r"int4(?:-g(\d+))?")


@dataclass(frozen=True)
class QuantSpec:
    """How a model's linears hold their weights: `int8`, or `int4` in groups of `group_size`."""

    scheme: str
    group_size: int = DEFAULT_INT4_GROUP  # int4 only: input columns per scale and zero

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES[1:]:
            raise ModelLoadError(f"quantization scheme {self.scheme!r} is not int8 or int4")
        if self.scheme == "int4" and self.group_size < MIN_INT4_GROUP:
            raise ModelLoadError(
                f"int4 group size {self.group_size} is below {MIN_INT4_GROUP}; pick 32, 64 or 128"
            )

    @classmethod
    def parse(cls, name: str) -> QuantSpec | None:
        """`none` -> None; `int8`; `int4` (groups of 32) or `int4-g<N>` (groups of N)."""
        if name == "none":
            return None
        if name == "int8":
            return cls("int8")
        match = _INT4_NAME.fullmatch(name)
        if match is None:
            raise ModelLoadError(
                f"quantization {name!r} is not one of {', '.join(SCHEMES)} "
                "(int4 also takes a group size, as int4-g64)"
            )
        group = match.group(1)
        return cls("int4", int(group) if group else DEFAULT_INT4_GROUP)


def int4_group(in_features: int, group_size: int, layer: str) -> int:
    """The group a layer with `in_features` input columns (on this rank) uses.

    Groups must tile the rank's own columns: a group straddling a TP shard boundary would need
    the other rank's weights. So a width the group does not divide falls back to the largest
    divisor below it (a finer grid: more scale bytes, no less accuracy); with none of at least
    MIN_INT4_GROUP, the layer cannot be int4.
    """
    for group in range(min(group_size, in_features), MIN_INT4_GROUP - 1, -1):
        if in_features % group == 0:
            return group
    raise ModelLoadError(
        f"int4: {layer} has {in_features} input columns on this rank, and no group of "
        f"{MIN_INT4_GROUP} to {group_size} columns divides them (a group may not straddle a "
        "tensor-parallel shard); use quantization int8, or a tensor_parallel_size that leaves "
        f"each rank a multiple of {MIN_INT4_GROUP} columns"
    )


def quantize_int8(
    w: torch.Tensor, scale_dtype: torch.dtype, row_absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> q int8 [N, K], scale [N] (scale_dtype) with w ~= q * scale[:, None].

    row_absmax [N]: max |w| over each whole row when w holds only some of its columns (a
    row-parallel shard), so every rank, and TP 1, use the same scale; default: w's own.
    """
    w = w.float()
    absmax = w.abs().amax(dim=1) if row_absmax is None else row_absmax.float()
    scale = _positive((absmax / 127).to(scale_dtype))
    q = (w / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] weights int8 codes and row scales stand for."""
    return q.float() * scale.float()[:, None]


def quantize_int4(
    w: torch.Tensor, group: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> codes uint8 [N, K] in [0, 15], scale_zero [K / group, N, 2] (scale_dtype).

    scale_zero is tinygemm's layout: [..., 0] the scale and [..., 1] the zero of each group.
    """
    n, k = w.shape
    groups = w.float().view(n, k // group, group)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = _positive(((hi - lo) / 15).to(scale_dtype)).float()
    zero = (lo + 8 * scale).to(scale_dtype).float()
    q = ((groups - zero[..., None]) / scale[..., None]).round_().add_(8).clamp_(0, 15)
    scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()
    return q.to(torch.uint8).view(n, k), scale_zero.to(scale_dtype)


def dequantize_int4_t(packed: torch.Tensor, scale_zero: torch.Tensor, n: int) -> torch.Tensor:
    """W^T, float32 [K, N], from packed codes (see pack_int4) and their scales and zeros.

    Transposed because the packed blocks keep K outermost: W^T comes out in contiguous runs of
    a block's rows, where W would need a byte-wise transpose (measured ~2x slower).
    """
    num_groups = scale_zero.shape[0]
    blocks, k, half = packed.shape
    codes = torch.empty(k, blocks, 2 * half, dtype=torch.float32, device=packed.device)
    by_k = packed.transpose(0, 1)  # [K, blocks, half]
    codes[..., :half] = by_k & 15
    codes[..., half:] = by_k >> 4
    scale = scale_zero[..., 0].float()[:, None, :]  # [groups, 1, N]
    zero = scale_zero[..., 1].float()[:, None, :]
    w_t = torch.addcmul(zero - 8 * scale, codes.view(num_groups, k // num_groups, n), scale)
    return w_t.view(k, n)


def pack_int4(q: torch.Tensor, block_rows: int) -> torch.Tensor:
    """codes [N, K] -> uint8 [N / block_rows, K, block_rows / 2], two codes a byte.

    In block b at column k, byte j holds row b*block_rows + j in its low nibble and row
    b*block_rows + block_rows/2 + j in its high one. With block_rows 64 (AVX-512) or 32 (AVX2)
    this is byte for byte what `_convert_weight_to_int4pack_for_cpu` makes, so the fused kernel
    and the dequantizing path read one copy; elsewhere one block of all N rows.
    """
    n, k = q.shape
    half = block_rows // 2
    blocks = q.view(n // block_rows, 2, half, k).transpose(2, 3)  # [blocks, 2, K, half]
    return (blocks[:, 0] | (blocks[:, 1] << 4)).contiguous()


@functools.cache
def cpu_int4_kernel_block_rows() -> int | None:
    """Rows per block of torch's CPU int4 kernel layout here (None: not one pack_int4 makes).

    The layout follows the CPU's vector width (64 rows with AVX-512, 32 with AVX2, something
    else without either), so ask the packing op once rather than assume.
    """
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for rows in (64, 32):
        if torch.equal(pack_int4(q.to(torch.uint8), rows).flatten(), theirs.flatten()):
            return rows
    return None


def _positive(scale: torch.Tensor) -> torch.Tensor:
    # an all-zero row or group has no range: any positive scale reproduces it exactly
    return scale.clamp(min=torch.finfo(scale.dtype).smallest_normal)
