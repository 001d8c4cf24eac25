"""Paged KV cache tensors: one tensor for all layers, indexed by block id.

Layout: [num_layers, 2 (K, V), num_blocks, block_size, kv_heads_local, head_dim]. A block holds
`block_size` consecutive tokens of one sequence; the block manager decides which.
"""

from __future__ import annotations

import torch

from pdserve.engine.config import ModelConfig


def kv_cache_shape(
    config: ModelConfig, tp_size: int, num_blocks: int, block_size: int
) -> tuple[int, ...]:
    """[num_layers, 2, num_blocks, block_size, kv_heads_local, head_dim]"""
    return (
        config.num_layers,
        2,
        num_blocks,
        block_size,
        config.kv_heads_local(tp_size),
        config.head_dim,
    )


def allocate_kv_cache(
    config: ModelConfig,
    tp_size: int,
    num_blocks: int,
    block_size: int,
    device: torch.device | str,
) -> torch.Tensor:
    """A zeroed cache in the model's dtype (zeros: unused slots never hold NaN garbage)."""
    shape = kv_cache_shape(config, tp_size, num_blocks, block_size)
    return torch.zeros(shape, dtype=config.dtype, device=device)


def bytes_per_block(config: ModelConfig, tp_size: int, block_size: int) -> int:
    return config.kv_bytes_per_token(tp_size) * block_size


def num_blocks_for_bytes(config: ModelConfig, tp_size: int, block_size: int, nbytes: int) -> int:
    """How many whole blocks fit in `nbytes` (0 if not even one does)."""
    return max(0, nbytes // bytes_per_block(config, tp_size, block_size))
