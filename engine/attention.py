"""Attention over packed prefill tokens and over the paged KV cache for decode.

Cache layout per layer: k_cache, v_cache: [num_blocks, block_size, kv_heads_local, head_dim];
token t of a sequence lives in slot block_table[t // block_size] * block_size + t % block_size.
A sliding window W lets the query at position p see keys at positions (p - W, p].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillMetadata:
    """Sequences packed back to back, each starting at position 0."""

    seq_lens: list[int]  # tokens per sequence, in input_ids order
    slot_mapping: torch.Tensor | None = None  # [T] int64 cache slot per token; None: don't write


@dataclass
class DecodeMetadata:
    """One new token per sequence, attending to everything cached for it (itself included)."""

    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [B] int64: cached tokens incl. the one decoded now
    slot_mapping: torch.Tensor  # [B] int64: where the new token's K/V goes


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k, v: [T, kv_heads, head_dim] into their cache slots."""
    # view (not reshape) so a non-contiguous cache fails loudly instead of writing to a copy
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def _window_mask(n: int, window: int, device: torch.device) -> torch.Tensor:
    # [n, n] bool: key j visible to query i iff i - window < j <= i
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & (j > i - window)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Causal attention within each packed sequence.

    q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] -> [T, heads, head_dim]
    """
    out = torch.empty_like(q)
    start = 0
    for n in seq_lens:
        end = start + n
        # [1, heads, n, head_dim]
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        mask = _window_mask(n, window, q.device) if window is not None and n > window else None
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
        out[start:end] = o[0].transpose(0, 1)
        start = end
    if start != q.shape[0]:
        raise ValueError(f"seq_lens sum to {start} but {q.shape[0]} tokens were given")
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: DecodeMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """One query per sequence against its cached blocks, one batched SDPA call.

    q: [B, heads, head_dim] -> [B, heads, head_dim]
    """
    batch, max_blocks = meta.block_tables.shape
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    length = max_blocks * block_size
    # gather whole blocks: [B * max_blocks, block_size, kv_heads, D] -> [B, kv_heads, L, D], the
    # last step a strided view SDPA reads as is. index_select copies block-sized rows, several
    # times faster on CPU than advanced indexing (k_cache[block_tables]), which copies elements.
    flat = meta.block_tables.flatten()
    k = k_cache.index_select(0, flat).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, flat).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    pos = torch.arange(length, device=q.device)[None, :]
    ctx = meta.context_lens[:, None]
    visible = pos < ctx  # [B, L]: padding slots and unused tails of blocks are hidden
    if window is not None:
        visible &= pos >= ctx - window
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=True
    )  # [B, heads, 1, D]
    return o.squeeze(2)
