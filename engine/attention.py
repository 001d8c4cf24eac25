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


@dataclass
class DecodePlan:
    """What every layer of one decode step gathers and masks, worked out once per step."""

    slot_mapping: torch.Tensor  # [B] where the new token's K/V goes
    block_ids: torch.Tensor  # [B * n] blocks to gather, n per sequence in position order
    visible: torch.Tensor  # [B, 1, 1, n * block_size] bool: gathered slots the query may see


def plan_decode(meta: DecodeMetadata, block_size: int, window: int | None) -> DecodePlan:
    """Gather whole blocks; with a sliding window only the ones the window can reach."""
    tables, ctx = meta.block_tables, meta.context_lens[:, None]
    n = tables.shape[1]
    first = torch.zeros_like(ctx)  # [B, 1] first gathered block, in table order
    if window is not None and (window - 1) // block_size + 2 < n:
        # positions ctx-window .. ctx-1 touch at most (window-1)//block_size + 2 blocks
        n = (window - 1) // block_size + 2
        lowest = (ctx - window).clamp(min=0) // block_size
        first = lowest.clamp(max=tables.shape[1] - n)
        tables = tables.gather(1, first + torch.arange(n, device=tables.device))
    pos = first * block_size + torch.arange(n * block_size, device=tables.device)  # [B, L]
    visible = pos < ctx  # hides table padding and the unused tail of the last block
    if window is not None:
        visible &= pos >= ctx - window
    return DecodePlan(meta.slot_mapping, tables.flatten(), visible[:, None, None, :])


def decode_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    plan: DecodePlan,
    scale: float,
) -> torch.Tensor:
    """One query per sequence against its cached blocks, one batched SDPA call.

    q: [B, heads, head_dim]; cache: [2, num_blocks, block_size, kv_heads, D] -> [B, heads, D]
    """
    batch, heads, _ = q.shape
    kv_heads, head_dim = cache.shape[3:]
    # Gather whole blocks of K and V in one call: [2, B * n, block_size, kv_heads, D].
    # index_select copies block-sized rows, several times faster on CPU than advanced
    # indexing (cache[:, block_tables]), which copies element by element.
    kv = cache.index_select(1, plan.block_ids).view(2, batch, -1, kv_heads, head_dim)
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [B, kv_heads, L, D], strided views
    # GQA as a query length: the heads sharing a KV head become its queries, so each K/V row
    # is read once per KV head (faster on CPU than enable_gqa). [B, kv_heads, group, D]
    grouped = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    o = F.scaled_dot_product_attention(grouped, k, v, attn_mask=plan.visible, scale=scale)
    return o.reshape(batch, heads, head_dim)
