"""A linear layer's weight held quantized, and the matmul paths that read it.

On CPU a quantized layer computes in bfloat16 whatever the model's dtype: torch's fused int8 and
int4 kernels are vectorised only for bf16 (float32 inputs measured 10-100x slower), and bf16
GEMMs run on AMX/AVX-512-BF16. The fastest path depends on the token count (measured at
SmolLM2's qkv/o/gate_up/down shapes, one thread; the table is in the commit adding this file):

- few tokens (decode): the fused kernels read 1 or 0.5 byte a weight, 1.3-2.4x faster than
  float32 F.linear at 1 token on all but the smallest (576x576) layer; they loop matrix-vector
  products, so their time grows with every token.
- many tokens (prefill): dequantize the whole weight to bf16, then one bf16 GEMM: at 1024 tokens
  2.8-3.7x (int8) and 1.9-2.4x (int4) faster than float32, the dequantization amortised.

On CUDA the layer computes in the model's dtype through the dequantizing path (no fused kernel
is wired up there yet, none measured); the memory saving is the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pdserve.engine.parallel import TPGroup
from pdserve.engine.quantization import (
    QuantSpec,
    cpu_int4_kernel_block_rows,
    dequantize_int4_t,
    int4_group,
    pack_int4,
    quantize_int4,
    quantize_int8,
)

# Token counts up to which the fused CPU kernel runs; above, dequantize + bf16 GEMM. The
# crossovers at SmolLM2's four shapes: int8 12-16 tokens, int4 ~64 (dequantizing int4 costs
# 0.6-4 ms a layer, so the fused kernel stays ahead longer).
INT8_FUSED_MAX_TOKENS = 12
INT4_FUSED_MAX_TOKENS = 64
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
# torch 2.13's CPU _weight_int8pack_mm does not check this: with K = 8, 24, 40, 72, 88 or 136
# input columns it returned wrong rows, then crashed (measured); 16, 48, 64, 80, 176 were right.
INT8_KERNEL_COLUMNS = 16


class QuantizedWeight(nn.Module):
    """W: [out_features, in_features] held quantized; forward(x) = x W^T in x's dtype.

    Built empty with the layer; `load` quantizes the checkpoint's float weight (this rank's
    shard, on the model's device) into buffers, so their bytes count as the model's.
    """

    def __init__(self, out_features: int, in_features: int, model_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.model_dtype = model_dtype

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        return torch.bfloat16 if device.type == "cpu" else self.model_dtype

    def load(self, w: torch.Tensor, row_group: TPGroup | None = None) -> None:
        """Quantize this rank's float weight [out, in]; row_group: the ranks holding the other
        columns of these rows (row-parallel layers), for statistics that span a whole row."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float32 weights [out, in] the layer multiplies by (for tests and error checks)."""
        raise NotImplementedError


class Int8Weight(QuantizedWeight):
    """Symmetric int8, one scale per output row."""

    codes: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # [N], compute dtype

    def __init__(self, out_features: int, in_features: int, model_dtype: torch.dtype) -> None:
        super().__init__(out_features, in_features, model_dtype)
        self.fused = False  # set by load: the CPU kernel can run this layer
        self.register_buffer("codes", None)
        self.register_buffer("scale", None)

    def load(self, w: torch.Tensor, row_group: TPGroup | None = None) -> None:
        assert w.shape == (self.out_features, self.in_features), w.shape
        absmax = _row_absmax(w, row_group)
        self.codes, self.scale = quantize_int8(w, self.compute_dtype(w.device), absmax)
        self.fused = w.device.type == "cpu" and self.in_features % INT8_KERNEL_COLUMNS == 0

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        xc = x.to(self.scale.dtype).contiguous()
        if self.fused and x.shape[0] <= INT8_FUSED_MAX_TOKENS:
            y = torch._weight_int8pack_mm(xc, self.codes, self.scale)
        else:  # int8 codes are exact in bf16: only the GEMM's own rounding
            y = F.linear(xc, self.codes.to(xc.dtype)) * self.scale
        return y.to(x.dtype)


class Int4Weight(QuantizedWeight):
    """Asymmetric int4 in groups of input columns, packed two codes a byte (see pack_int4)."""

    packed: torch.Tensor  # uint8 [N / block_rows, K, block_rows / 2]
    scale_zero: torch.Tensor  # [K / group, N, 2], compute dtype

    def __init__(
        self, out_features: int, in_features: int, model_dtype: torch.dtype, group: int
    ) -> None:
        super().__init__(out_features, in_features, model_dtype)
        if out_features % 2:
            raise ValueError(f"int4 packs rows in pairs; {out_features} output rows is odd")
        self.group = group
        self.fused = False  # set by load: the CPU kernel can read this layer's layout
        self.register_buffer("packed", None)
        self.register_buffer("scale_zero", None)

    def load(self, w: torch.Tensor, row_group: TPGroup | None = None) -> None:
        # groups never straddle a shard (int4_group), so no statistic needs the other ranks
        assert w.shape == (self.out_features, self.in_features), w.shape
        q, self.scale_zero = quantize_int4(w, self.group, self.compute_dtype(w.device))
        rows = self._kernel_block_rows(w.device)
        self.fused = rows is not None
        self.packed = pack_int4(q, rows or self.out_features)

    def _kernel_block_rows(self, device: torch.device) -> int | None:
        """The CPU kernel's block height when it can run this layer, else None."""
        if device.type != "cpu" or self.group not in INT4_KERNEL_GROUPS:
            return None
        rows = cpu_int4_kernel_block_rows()
        return rows if rows is not None and self.out_features % rows == 0 else None

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4_t(self.packed, self.scale_zero, self.out_features).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        xc = x.to(self.scale_zero.dtype).contiguous()
        if self.fused and x.shape[0] <= INT4_FUSED_MAX_TOKENS:
            weight = self.packed.view(self.out_features, -1)  # the kernel's [N, K / 2] view
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, weight, self.group, self.scale_zero)
        else:
            w_t = dequantize_int4_t(self.packed, self.scale_zero, self.out_features)
            y = xc @ w_t.to(xc.dtype)
        return y.to(x.dtype)


def quantized_weight(
    spec: QuantSpec, out_features: int, in_features: int, dtype: torch.dtype, layer: str
) -> QuantizedWeight:
    """An empty quantized weight for a layer of this rank's shape; errors name the layer."""
    if spec.scheme == "int8":
        return Int8Weight(out_features, in_features, dtype)
    group = int4_group(in_features, spec.group_size, layer)
    return Int4Weight(out_features, in_features, dtype, group)


def _row_absmax(w: torch.Tensor, row_group: TPGroup | None) -> torch.Tensor:
    """max |w| per row [N], over the whole row when other ranks hold some of its columns.

    One scale per whole row, as at TP 1, keeps a TP n model the same quantized model: each rank
    quantizes exactly the slice of TP 1's codes it holds (a shard's own max would be a finer,
    different grid). One small all-reduce per row-parallel layer, at load.
    """
    absmax = w.float().abs().amax(dim=1)
    if row_group is not None and row_group.size > 1:
        assert row_group.pg is not None  # TPGroup checks
        row_group.pg.allreduce([absmax], op=dist.ReduceOp.MAX).wait()
    return absmax
