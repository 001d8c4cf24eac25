"""Attention over packed prefill tokens, over the paged KV cache for decode, and over both at
once for a mixed step (decode tokens plus prefill chunks that continue earlier chunks).

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

from pdserve.engine.kv_cache import half_block_ids, kv_rows
from pdserve.engine.kv_quant import from_cache_rows, movable, to_cache_rows


@dataclass
class PrefillMetadata:
    """Sequences packed back to back, each starting at position 0."""

    seq_lens: list[int]  # tokens per sequence, in input_ids order
    slot_mapping: torch.Tensor | None = None  # [T] int64 cache slot per token; None: don't write


@dataclass
class DecodeMetadata:
    """One new token per sequence, attending to everything cached for it (itself included);
    with ``query_lens``, q_i >= 1 consecutive tokens of sequence i (its decode token and the
    drafts it verifies), each seeing the cache up to its own position."""

    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [B] int64: cached tokens incl. the ones computed now
    slot_mapping: torch.Tensor  # [T] int64: where the new tokens' K/V go (T = B without drafts)
    query_lens: list[int] | None = None  # tokens per sequence this step; None: one each


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> None:
    """Scatter k, v: [T, kv_heads, head_dim] into a layer's cache [num_blocks, 2, block_size,
    kv_heads, row] at K rows ``rows`` (``kv_rows`` of the tokens' slots), in its format."""
    k, v = to_cache_rows(k, cache.dtype), to_cache_rows(v, cache.dtype)
    # view (not reshape) so a non-contiguous cache fails loudly instead of writing to a copy
    flat = movable(cache).view(-1, *k.shape[1:])
    flat.index_copy_(0, rows, movable(k))
    flat.index_copy_(0, rows + cache.shape[2], movable(v))


def _gather(cache: torch.Tensor, half_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks of K, then of V, as ``dtype`` values: [2 * n, block_size, kv_heads, D] for
    ``half_block_ids``. index_select copies block-sized rows, several times faster on CPU than
    advanced indexing (element by element); only the gathered blocks are dequantized."""
    return from_cache_rows(cache.view(-1, *cache.shape[2:]).index_select(0, half_ids), dtype)


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

    kv_rows: torch.Tensor  # [T] K rows (kv_rows) where the new tokens' K/V go
    half_ids: torch.Tensor  # [2 * B * n] half blocks to gather (half_block_ids), n per sequence
    visible: torch.Tensor  # [B, 1, Q, n * block_size] bool: gathered slots each query may see
    # several queries per sequence (drafts): token t of the packed batch is row q_index[t] of
    # the [B * Q] padded queries; None when every sequence has one (Q == 1)
    q_index: torch.Tensor | None = None
    # a step where only some sequences verify drafts: (their tokens' indices, their plan) for
    # the one-query sequences and for the others, so the former are not padded to Q queries
    parts: list[tuple[torch.Tensor, DecodePlan]] | None = None


def plan_decode(meta: DecodeMetadata, block_size: int, window: int | None) -> DecodePlan:
    """Gather whole blocks; with a sliding window only the ones the window can reach."""
    lens = meta.query_lens
    if lens and 1 in lens and max(lens) > 1:
        return _plan_split(meta, block_size, window)
    tables, ctx = meta.block_tables, meta.context_lens[:, None]
    dev = tables.device
    lens = meta.query_lens
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
        q_len = torch.tensor(lens, device=dev)[:, None]
        j = torch.arange(width, device=dev)
        # query j of a sequence sits at ctx - q_len + j; padding rows (j >= q_len) copy the
        # last one, so they see keys (no NaN), and are dropped
        query = ctx - q_len + j.minimum(q_len - 1)  # [B, Q]
        q_index = (torch.arange(len(lens), device=dev)[:, None] * width + j)[j < q_len]
    # [B, Q, L]: causal up to each query; hides table padding and the last block's unused tail
    visible = pos[:, None, :] <= query[:, :, None]
    if window is not None:
        visible &= pos[:, None, :] > query[:, :, None] - window
    rows = kv_rows(meta.slot_mapping, block_size)
    return DecodePlan(rows, half_block_ids(tables.flatten()), visible[:, None], q_index)


def _plan_split(meta: DecodeMetadata, block_size: int, window: int | None) -> DecodePlan:
    """Plans for the one-query sequences and for the ones with drafts, run one after the other."""
    assert meta.query_lens is not None
    lens = meta.query_lens
    dev = meta.block_tables.device
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    parts = []
    for seqs in (
        [i for i, n in enumerate(lens) if n == 1],
        [i for i, n in enumerate(lens) if n > 1],
    ):
        index = torch.tensor(seqs, dtype=torch.int64, device=dev)
        tokens = torch.tensor(
            [t for i in seqs for t in range(starts[i], starts[i + 1])],
            dtype=torch.int64,
            device=dev,
        )
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
    """One query per sequence against its cached blocks, one batched SDPA call.

    q: [B, heads, D]; cache: [num_blocks, 2, block_size, kv_heads, row] -> [B, heads, D]
    """
    if plan.parts is not None:
        out = torch.empty_like(q)
        for tokens, part in plan.parts:
            out[tokens] = decode_attention(q.index_select(0, tokens), cache, part, scale)
        return out
    if plan.q_index is not None:
        return _multi_query_attention(q, cache, plan, scale)
    batch, heads, head_dim = q.shape
    kv_heads = cache.shape[3]
    # whole blocks of K and V in one call: [2, B, n * block_size, kv_heads, D]
    kv = _gather(cache, plan.half_ids, q.dtype).view(2, batch, -1, kv_heads, head_dim)
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [B, kv_heads, L, D], strided views
    # GQA as a query length: the heads sharing a KV head become its queries, so each K/V row
    # is read once per KV head (faster on CPU than enable_gqa). [B, kv_heads, group, D]
    grouped = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    o = F.scaled_dot_product_attention(grouped, k, v, attn_mask=plan.visible, scale=scale)
    return o.reshape(batch, heads, head_dim)


def _multi_query_attention(
    q: torch.Tensor, cache: torch.Tensor, plan: DecodePlan, scale: float
) -> torch.Tensor:
    """Decode with drafts: q_i queries per sequence, padded to Q, one batched SDPA call.

    q: [T, heads, D] packed -> [T, heads, D]
    """
    assert plan.q_index is not None
    batch, width = plan.visible.shape[0], plan.visible.shape[2]
    heads, head_dim = q.shape[1:]
    kv_heads = cache.shape[3]
    group = heads // kv_heads
    padded = q.new_zeros(batch * width, heads, head_dim)
    padded[plan.q_index] = q
    kv = _gather(cache, plan.half_ids, q.dtype).view(2, batch, -1, kv_heads, head_dim)
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [B, kv_heads, L, D]
    # GQA as a query length, as in decode: [B, kv_heads, Q * group, D], queries major
    grouped = (
        padded.view(batch, width, kv_heads, group, head_dim)
        .transpose(1, 2)
        .reshape(batch, kv_heads, width * group, head_dim)
    )
    mask = plan.visible.repeat_interleave(group, dim=2)  # [B, 1, Q * group, L]
    o = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
    o = o.view(batch, kv_heads, width, group, head_dim).transpose(1, 2)
    return o.reshape(batch * width, heads, head_dim)[plan.q_index]


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
    kv = _gather(cache, chunk.half_ids, q.dtype).view(2, -1, kv_heads, head_dim)  # [2, L, kvh, D]
    k, v = kv[0].transpose(0, 1)[None], kv[1].transpose(0, 1)[None]  # [1, kv_heads, L, D]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k, v, attn_mask=chunk.visible, scale=scale, enable_gqa=True
    )
    return o[0].transpose(0, 1)
