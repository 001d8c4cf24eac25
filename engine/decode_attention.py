"""Decode attention over the paged KV cache: each sequence's new token (and the drafts it
verifies) against everything cached for it.

Two paths, chosen per step by ``DecodeMetadata.backend``:

- ``sdpa`` (the reference, and the CPU default): gather each sequence's blocks with
  index_select (dequantizing a scaled cache on the way), then one batched SDPA call with a
  [B, 1, Q, L] mask. Serves every step: drafts (engine/multi_query_attention.py), mixed steps,
  any KV cache format.
- ``flex`` (CUDA's default for pure decode steps): FlexAttention reads the blocks in place
  through a paged BlockMask (engine/paged_flex_attention.py); one query per sequence, a cache
  in the model's dtype.

Token t of a sequence lives in slot block_table[t // block_size] * block_size + t % block_size;
a sliding window W lets the query at position p see keys at positions (p - W, p].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.kv_cache import half_block_ids, kv_rows
from pdserve.engine.kv_quant import from_cache_rows
from pdserve.engine.multi_query_attention import (
    draft_queries,
    multi_query_sdpa,
    split_by_query_len,
)
from pdserve.engine.paged_flex_attention import (
    FlexDecodePlan,
    flex_decode_attention,
    plan_flex_decode,
)

SDPA, FLEX = "sdpa", "flex"


@dataclass
class DecodeMetadata:
    """One new token per sequence, attending to everything cached for it (itself included);
    with ``query_lens``, q_i >= 1 consecutive tokens of sequence i (its decode token and the
    drafts it verifies), each seeing the cache up to its own position."""

    block_tables: torch.Tensor  # [B, max_blocks] int64, padded (entries past a seq's blocks unread)
    context_lens: torch.Tensor  # [B] int64: cached tokens incl. the ones computed now
    slot_mapping: torch.Tensor  # [T] int64: where the new tokens' K/V go (T = B without drafts)
    query_lens: list[int] | None = None  # tokens per sequence this step; None: one each
    backend: str = SDPA  # FLEX: read the cache in place (one query each, cache in model dtype)


@dataclass
class DecodePlan:
    """What every layer of one decode step gathers and masks, worked out once per step."""

    kv_rows: torch.Tensor  # [T] K rows (kv_rows) where the new tokens' K/V go
    half_ids: torch.Tensor  # [2 * B * n] half blocks to gather (half_block_ids), n per sequence
    visible: torch.Tensor  # [B, 1, Q, n * block_size] bool: gathered slots each query may see
    # several queries per sequence (drafts): token t of the packed batch is row q_index[t] of
    # the [B * Q] padded queries; None when every sequence has one (Q == 1)
    q_index: torch.Tensor | None = None
    # a step where only some sequences verify drafts: (their tokens' indices, their plan) for
    # the one-query sequences and for the others, so the former are not padded to Q queries
    parts: list[tuple[torch.Tensor, DecodePlan]] | None = None
    flex: FlexDecodePlan | None = None  # the flex path: nothing is gathered


def gather_blocks(cache: torch.Tensor, half_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks of K, then of V, as ``dtype`` values: [2 * n, block_size, kv_heads, D] for
    ``half_block_ids``. index_select copies block-sized rows, several times faster on CPU than
    advanced indexing (element by element); only the gathered blocks are dequantized."""
    return from_cache_rows(cache.view(-1, *cache.shape[2:]).index_select(0, half_ids), dtype)


def plan_decode(
    meta: DecodeMetadata,
    block_size: int,
    window: int | None,
    *,
    num_blocks: int = 0,
    group: int = 1,
) -> DecodePlan:
    """Gather whole blocks; with a sliding window only the ones the window can reach. The flex
    path needs the cache's ``num_blocks`` and the query heads per KV head (``group``)."""
    lens = meta.query_lens
    if lens and 1 in lens and max(lens) > 1:
        return _plan_split(meta, block_size, window)
    rows = kv_rows(meta.slot_mapping, block_size)
    if meta.backend == FLEX:
        return _plan_flex(meta, rows, block_size, window, num_blocks, group)
    tables, ctx = meta.block_tables, meta.context_lens[:, None]
    dev = tables.device
    width = max(lens) if lens else 1
    n = tables.shape[1]
    first = torch.zeros_like(ctx)  # [B, 1] first gathered block, in table order
    if window is not None and (window + width - 2) // block_size + 2 < n:
        # positions ctx-width+1-window .. ctx-1 touch at most this many blocks
        n = (window + width - 2) // block_size + 2
        lowest = (ctx - width + 1 - window).clamp(min=0) // block_size
        first = lowest.clamp(max=tables.shape[1] - n)
        tables = tables.gather(1, first + torch.arange(n, device=dev))
    pos = first * block_size + torch.arange(n * block_size, device=dev)  # [B, L]
    q_index = None
    if width == 1:
        query = ctx - 1  # [B, 1]
    else:
        assert lens is not None
        query, q_index = draft_queries(ctx, lens, width)  # [B, Q]
    # [B, Q, L]: causal up to each query; hides table padding and the last block's unused tail
    visible = pos[:, None, :] <= query[:, :, None]
    if window is not None:
        visible &= pos[:, None, :] > query[:, :, None] - window
    return DecodePlan(rows, half_block_ids(tables.flatten()), visible[:, None], q_index)


def _plan_flex(
    meta: DecodeMetadata,
    rows: torch.Tensor,
    block_size: int,
    window: int | None,
    num_blocks: int,
    group: int,
) -> DecodePlan:
    if meta.query_lens is not None:
        raise ValueError("the flex decode path takes one query per sequence; drafts use sdpa")
    if num_blocks < 1:
        raise ValueError("a flex decode plan needs the cache's num_blocks")
    flex = plan_flex_decode(
        meta.block_tables, meta.context_lens, block_size, window, num_blocks, group
    )
    dev = rows.device
    nothing = torch.empty(0, dtype=torch.int64, device=dev)
    return DecodePlan(rows, nothing, torch.empty(0, dtype=torch.bool, device=dev), flex=flex)


def _plan_split(meta: DecodeMetadata, block_size: int, window: int | None) -> DecodePlan:
    """Plans for the one-query sequences and for the ones with drafts, run one after the other."""
    assert meta.query_lens is not None
    lens = meta.query_lens
    dev = meta.block_tables.device
    parts = []
    for seqs, token_ids in split_by_query_len(lens):
        index = torch.tensor(seqs, dtype=torch.int64, device=dev)
        tokens = torch.tensor(token_ids, dtype=torch.int64, device=dev)
        sub = DecodeMetadata(
            meta.block_tables.index_select(0, index),
            meta.context_lens.index_select(0, index),
            meta.slot_mapping.index_select(0, tokens),
            [lens[i] for i in seqs] if lens[seqs[0]] > 1 else None,
        )
        parts.append((tokens, plan_decode(sub, block_size, window)))
    rows = kv_rows(meta.slot_mapping, block_size)
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    return DecodePlan(rows, empty, torch.empty(0, dtype=torch.bool, device=dev), None, parts)


def decode_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    plan: DecodePlan,
    scale: float,
) -> torch.Tensor:
    """Each sequence's queries against its cached blocks: one batched SDPA call over the
    gathered blocks, or flex over the cache in place.

    q: [T, heads, D] (T = B without drafts); cache: [num_blocks, 2, block_size, kv_heads, row]
    -> [T, heads, D]
    """
    if plan.parts is not None:
        out = torch.empty_like(q)
        for tokens, part in plan.parts:
            out[tokens] = decode_attention(q.index_select(0, tokens), cache, part, scale)
        return out
    if plan.flex is not None:
        return flex_decode_attention(q, cache, plan.flex, scale)
    batch = plan.visible.shape[0]
    heads, head_dim = q.shape[1:]
    kv_heads = cache.shape[3]
    # whole blocks of K and V in one call: [2, B, n * block_size, kv_heads, D]
    kv = gather_blocks(cache, plan.half_ids, q.dtype).view(2, batch, -1, kv_heads, head_dim)
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [B, kv_heads, L, D], strided views
    if plan.q_index is not None:
        return multi_query_sdpa(q, k, v, plan.visible, plan.q_index, scale)
    # GQA as a query length: the heads sharing a KV head become its queries, so each K/V row
    # is read once per KV head (faster on CPU than enable_gqa). [B, kv_heads, group, D]
    grouped = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    o = F.scaled_dot_product_attention(grouped, k, v, attn_mask=plan.visible, scale=scale)
    return o.reshape(batch, heads, head_dim)
