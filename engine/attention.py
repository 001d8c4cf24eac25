"""Attention over packed prefill tokens, and over the paged KV cache for a mixed step (decode
tokens plus prefill chunks that continue earlier chunks); decode attention itself lives in
engine/decode_attention.py (its names are exported here too).

Cache layout per layer: [num_blocks, 2 (K, V), block_size, kv_heads_local, head_dim] (see
engine/kv_cache.py); token t of a sequence lives in slot
block_table[t // block_size] * block_size + t % block_size.
A sliding window W lets the query at position p see keys at positions (p - W, p].
The cache's dtype is its storage format: writes convert (or quantize) K/V into it, and the
gathered blocks are converted (or dequantized) to the queries' dtype before attention; a cache
in the model's dtype takes neither step (engine/kv_quant.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.decode_attention import (
    DecodeMetadata,
    DecodePlan,
    decode_attention,
    gather_blocks,
    plan_decode,
)
from pdserve.engine.kv_cache import half_block_ids, kv_rows
from pdserve.engine.kv_quant import movable, to_cache_rows

__all__ = [  # decode's names too: one import site for the model, runners and tests
    "ChunkPlan",
    "DecodeMetadata",
    "DecodePlan",
    "MixedMetadata",
    "MixedPlan",
    "PrefillMetadata",
    "decode_attention",
    "mixed_attention",
    "plan_decode",
    "plan_mixed",
    "prefill_attention",
    "write_kv",
]


@dataclass
class PrefillMetadata:
    """Sequences packed back to back, each starting at position 0."""

    seq_lens: list[int]  # tokens per sequence, in input_ids order
    slot_mapping: torch.Tensor | None = None  # [T] int64 cache slot per token; None: don't write


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> None:
    """Scatter k, v: [T, kv_heads, head_dim] into a layer's cache [num_blocks, 2, block_size,
    kv_heads, row] at K rows ``rows`` (``kv_rows`` of the tokens' slots), in its format."""
    k, v = to_cache_rows(k, cache.dtype), to_cache_rows(v, cache.dtype)
    # view (not reshape) so a non-contiguous cache fails loudly instead of writing to a copy
    flat = movable(cache).view(-1, *k.shape[1:])
    flat.index_copy_(0, rows, movable(k))
    flat.index_copy_(0, rows + cache.shape[2], movable(v))


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
class MixedMetadata:
    """One engine step in one forward: a decode batch and prefill chunks of other sequences.

    Tokens are the B decode tokens first (one per sequence, described by `decode`), then each
    chunk's tokens back to back. A chunk is positions [start, start + len) of one sequence; its
    K/V are written to the cache before attention, so its queries see that sequence's cached
    positions up to their own: the earlier chunks, and causally within the chunk.
    """

    decode: DecodeMetadata | None
    chunk_starts: list[int]  # position of each chunk's first token
    chunk_lens: list[int]
    chunk_tables: list[list[int]]  # each chunk's sequence's block table
    chunk_slots: torch.Tensor  # [sum(chunk_lens)] int64 cache slot per chunk token


@dataclass
class ChunkPlan:
    """How one chunk attends: to its own fresh K/V (start 0), or to gathered cache blocks."""

    start: int
    length: int
    half_ids: torch.Tensor | None  # [2 * n] half blocks to gather; None when start == 0
    visible: torch.Tensor | None  # [1, 1, length, n * block_size] bool


@dataclass
class MixedPlan:
    """What every layer of a mixed step writes, gathers and masks, worked out once per step."""

    num_decode: int
    decode: DecodePlan | None
    chunks: list[ChunkPlan]
    kv_rows: torch.Tensor  # [B + C] K rows of the decode tokens, then of the chunk tokens


def plan_mixed(meta: MixedMetadata, block_size: int, window: int | None) -> MixedPlan:
    """Decode's plan, and per chunk the blocks its window reaches and its causal mask."""
    decode = plan_decode(meta.decode, block_size, window) if meta.decode is not None else None
    chunks = [
        _plan_chunk(start, n, table, block_size, window, meta.chunk_slots.device)
        for start, n, table in zip(meta.chunk_starts, meta.chunk_lens, meta.chunk_tables)
    ]
    chunk_rows = kv_rows(meta.chunk_slots, block_size)
    rows = [chunk_rows] if decode is None else [decode.kv_rows, chunk_rows]
    num_decode = 0 if decode is None else decode.kv_rows.shape[0]
    return MixedPlan(num_decode, decode, chunks, torch.cat(rows))


def _plan_chunk(
    start: int,
    n: int,
    table: list[int],
    block_size: int,
    window: int | None,
    device: torch.device,
) -> ChunkPlan:
    if start == 0:  # nothing cached before it: attend to the chunk's own K/V, as prefill does
        return ChunkPlan(start, n, None, None)
    # a chunk query at p sees (p - window, p]: the lowest position any of them reaches
    lowest = 0 if window is None else max(0, start - window + 1)
    first, last = lowest // block_size, (start + n - 1) // block_size
    block_ids = torch.tensor(table[first : last + 1], dtype=torch.int64, device=device)
    key = first * block_size + torch.arange((last + 1 - first) * block_size, device=device)
    query = start + torch.arange(n, device=device)[:, None]
    visible = key <= query  # [n, L]; also hides the unwritten tail of the last block
    if window is not None:
        visible &= key > query - window
    return ChunkPlan(start, n, half_block_ids(block_ids), visible[None, None])


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    plan: MixedPlan,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Decode queries and chunk queries of one step over the paged cache.

    q: [B + C, heads, D]; k, v: [B + C, kv_heads, D]; cache: [num_blocks, 2, block_size,
    kv_heads, row] -> [B + C, heads, D]
    """
    write_kv(cache, k, v, plan.kv_rows)  # first: chunks read their own K/V
    out = torch.empty_like(q)
    start = plan.num_decode
    if plan.decode is not None:
        out[:start] = decode_attention(q[:start], cache, plan.decode, scale)
    for chunk in plan.chunks:
        end = start + chunk.length
        if chunk.half_ids is None:
            out[start:end] = prefill_attention(
                q[start:end], k[start:end], v[start:end], [chunk.length], scale, window
            )
        else:
            out[start:end] = _chunk_attention(q[start:end], cache, chunk, scale)
        start = end
    if start != q.shape[0]:
        raise ValueError(f"the plan covers {start} tokens but {q.shape[0]} were given")
    return out


def _chunk_attention(
    q: torch.Tensor, cache: torch.Tensor, chunk: ChunkPlan, scale: float
) -> torch.Tensor:
    # q: [n, heads, D] -> [n, heads, D], against the gathered blocks of its sequence
    assert chunk.half_ids is not None and chunk.visible is not None
    kv_heads, head_dim = cache.shape[3], q.shape[-1]
    kv = gather_blocks(cache, chunk.half_ids, q.dtype).view(
        2, -1, kv_heads, head_dim
    )  # [2, L, kvh, D]
    k, v = kv[0].transpose(0, 1)[None], kv[1].transpose(0, 1)[None]  # [1, kv_heads, L, D]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k, v, attn_mask=chunk.visible, scale=scale, enable_gqa=True
    )
    return o[0].transpose(0, 1)
