"""Paged KV cache tensors: one tensor for all layers, indexed by block id.

Layout: [num_layers, num_blocks, 2 (K, V), block_size, kv_heads_local, head_dim] (FlashInfer's
per-layer order). A block holds `block_size` consecutive tokens of one sequence, K then V; the
block manager decides which. Keeping a block's K and V together means the blocks of a run are
one contiguous region per layer: a KV transfer lands there as one message per layer, K and V
included (a [2, num_blocks, ...] layout would need two, on a wire where every message costs).
Slot s (block s // block_size, offset s % block_size) is K row ``kv_rows(s)`` of the layer's
[num_blocks * 2 * block_size, heads, head_dim] view, and V row ``kv_rows(s) + block_size``.

The cache's dtype is its storage format (``decode.kv_cache.dtype``, engine/kv_format.py): a
float dtype, or int8 / float8_e4m3fn with each (token, head) row's float16 scale in the row's
last 2 bytes, so the last dimension is head_dim + 2 there (engine/kv_quant.py).
"""

from __future__ import annotations

import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_format import row_bytes, row_width
from pdserve.engine.kv_quant import kv_dtype_name, storage_dtype


def kv_format(config: ModelConfig, kv_dtype: str = "auto") -> str:
    """The storage format's name for ``decode.kv_cache.dtype`` ("auto": the model's dtype)."""
    return kv_dtype_name(storage_dtype(kv_dtype, config.dtype))


def kv_cache_shape(
    config: ModelConfig, tp_size: int, num_blocks: int, block_size: int, kv_dtype: str = "auto"
) -> tuple[int, ...]:
    """[num_layers, num_blocks, 2, block_size, kv_heads_local, head_dim (+ 2: scaled formats)]"""
    return (
        config.num_layers,
        num_blocks,
        2,
        block_size,
        config.kv_heads_local(tp_size),
        row_width(kv_format(config, kv_dtype), config.head_dim),
    )


def allocate_kv_cache(
    config: ModelConfig,
    tp_size: int,
    num_blocks: int,
    block_size: int,
    device: torch.device | str,
    kv_dtype: str = "auto",
) -> torch.Tensor:
    """A zeroed cache in format ``kv_dtype`` (zeros: unused slots never hold NaN garbage)."""
    shape = kv_cache_shape(config, tp_size, num_blocks, block_size, kv_dtype)
    return torch.zeros(shape, dtype=storage_dtype(kv_dtype, config.dtype), device=device)


def bytes_per_block(
    config: ModelConfig, tp_size: int, block_size: int, kv_dtype: str = "auto"
) -> int:
    """Bytes of one block, every layer, K and V, scales included (what sizes a cache)."""
    per_row = row_bytes(kv_format(config, kv_dtype), config.head_dim)
    return 2 * config.num_layers * config.kv_heads_local(tp_size) * per_row * block_size


def num_blocks_for_bytes(
    config: ModelConfig, tp_size: int, block_size: int, nbytes: int, kv_dtype: str = "auto"
) -> int:
    """How many whole blocks fit in `nbytes` (0 if not even one does)."""
    return max(0, nbytes // bytes_per_block(config, tp_size, block_size, kv_dtype))


def kv_rows(slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """K rows of cache slots in a layer's [num_blocks * 2 * block_size, heads, head_dim] view
    (the V rows are ``block_size`` further on)."""
    return slots + (slots // block_size) * block_size


def half_block_ids(block_ids: torch.Tensor) -> torch.Tensor:
    """Rows of a layer's [num_blocks * 2, block_size, heads, head_dim] view: the K halves of
    ``block_ids`` then their V halves, so a gather of them views as [2, len(block_ids), ...]."""
    return torch.cat([block_ids * 2, block_ids * 2 + 1])
