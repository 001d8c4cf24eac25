"""Decode attention that reads the paged KV cache in place: FlexAttention with a paged BlockMask.

The SDPA path (engine/decode_attention.py) gathers every sequence's blocks into a fresh tensor
each step, so each step copies the whole live cache. Here one layer's cache is handed to
``flex_attention`` as it lies, viewed as one long sequence of rows: its
[num_blocks * 2 * block_size, kv_heads, D] view holds block b's K at rows
[2b * bs, (2b + 1) * bs) and its V one block_size further on, so the keys are ``rows[:-bs]``
and the values ``rows[bs:]`` (key row r pairs with value row r + bs). A sequence's pages are
K halves: the BlockMask lists, per sequence, the half-block ids 2 * block_table[j] of the blocks
its query can reach (all of them, or the ones a sliding window reaches), so the kernel loads
only those pages. The ``mask_mod`` then decides per slot, from the physical slot alone:

    block = slot // bs // 2;  j = logical[block]   (its index in the block table using it)
    visible = slot is a K row, block_table[b, j] == block, and j * bs + slot % bs is a position
              the query sees: < context_len (and >= context_len - window)

``logical`` (one int per cache block) is the inverse of this step's block tables. It is one
table for the whole batch, not one per sequence, because a block sits at one position in every
table that holds it (shared prefix blocks sit where their prefix is); the ownership check
``block_table[b, j] == block`` keeps other sequences' blocks out. So the mask is exact on its
own (eager CPU flex evaluates it over every slot), and the block list is only what makes the
compiled kernel skip the rest. The list has no "full" blocks: with full blocks the decode
kernel splits the whole cache length across its programs instead of the listed pages.

GQA is folded into the query axis, as on the SDPA path: a KV head's group of query heads is one
sequence of ``group`` queries against that head. Flex's decode kernel then serves any group
size (with ``enable_gqa`` it needs a power-of-two group, e.g. not Qwen2.5-7B's 7, and otherwise
falls back to a kernel whose tile must divide the 16-token page).

On CUDA the call is compiled (``torch.compile``: flex_attention is only fast compiled, as one
Triton kernel) with static shapes: the decode runner pads the batch and the tables to fixed
sizes (decode_worker/cuda_graphs.py), so each padded batch size compiles once. On CPU the eager
implementation runs (tests). Flex needs K/V in the queries' dtype: a cache stored in the model's
dtype (no int8 / fp8 KV cache; those read through the SDPA path, which dequantizes the blocks
it gathers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from pdserve.engine.deploy_config import ATTENTION_BACKENDS, flex_page_problem

Q_BLOCK = 128  # one query tile holds a row's queries (its GQA group); a multiple of 16
# torch.compile keeps this many specialisations of the flex call (one per padded batch size)
COMPILED_SHAPES = 32


@dataclass
class FlexDecodePlan:
    """What every layer of a decode step hands flex_attention, built once per step."""

    block_mask: BlockMask  # [B, 1, 1, n] pages per sequence, with the paged mask_mod


def resolve_attention_backend(
    setting: str,
    device: torch.device,
    cache_dtype: torch.dtype,
    model_dtype: torch.dtype,
    block_size: int = 16,
) -> str:
    """``decode.attention_backend`` settled: "sdpa" or "flex". ``auto`` is flex on CUDA when
    the cache holds the model's dtype in pages the kernel can tile (``flex_page_problem``),
    else sdpa; an explicit ``flex`` that cannot hold is an error that names the fix."""
    if setting not in ATTENTION_BACKENDS:
        raise ValueError(
            f"decode.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
            f"got {setting!r}"
        )
    in_place = cache_dtype == model_dtype
    if setting == "auto":
        tiles = flex_page_problem(block_size) is None
        return "flex" if device.type == "cuda" and in_place and tiles else "sdpa"
    if setting == "flex" and (problem := flex_page_problem(block_size)):
        raise ValueError(f"decode.attention_backend: flex {problem}")
    if setting == "flex" and not in_place:
        raise ValueError(
            f"decode.attention_backend: flex reads the KV cache in place, so the cache must "
            f"hold the model's dtype ({model_dtype}), not {cache_dtype}: set "
            "decode.kv_cache.dtype to auto, or attention_backend to sdpa (or auto)"
        )
    return setting


def allow_compiled_shapes(count: int) -> None:
    """Let torch.compile keep ``count`` specialisations of the flex call (one per padded batch
    size): past Dynamo's recompile limit a whole-graph compile fails instead of recompiling."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, count + 1)


def plan_flex_decode(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int | None,
    num_blocks: int,
    group: int,
) -> FlexDecodePlan:
    """The paged BlockMask of one decode step: one query per sequence (``group`` queries after
    GQA folding) at position context_len - 1, over a cache of ``num_blocks`` blocks.

    block_tables: [B, W] int64 (entries past a sequence's blocks are ignored); context_lens: [B].
    Device ops only (no host sync), so a CUDA graph can capture it.
    """
    dev = block_tables.device
    width = block_tables.shape[1]
    ctx = context_lens.to(torch.int64)
    n = width
    if window is not None:
        n = min(width, (window - 1) // block_size + 2)  # blocks a window of W positions touches
    lowest = (ctx - window).clamp(min=0) if window is not None else torch.zeros_like(ctx)
    first = (lowest // block_size).clamp(max=width - n)  # [B] first listed block, table order
    count = (ctx - 1) // block_size - first + 1  # [B] blocks up to the query's own
    cols = (first[:, None] + torch.arange(n, device=dev)).clamp(max=width - 1)
    pages = 2 * block_tables.gather(1, cols)  # [B, n] K halves, in units of block_size rows
    logical = _inverse_tables(block_tables, ctx, block_size, num_blocks)
    mask_mod = _paged_mask(logical, block_tables, ctx, block_size, window)
    kv_len = (2 * num_blocks - 1) * block_size  # rows of the keys view (rows[:-bs])
    mask = BlockMask.from_kv_blocks(
        count.to(torch.int32)[:, None, None],
        pages.to(torch.int32)[:, None, None, :],
        BLOCK_SIZE=(Q_BLOCK, block_size),
        mask_mod=mask_mod,
        seq_lengths=(group, kv_len),
        compute_q_blocks=False,  # forward only: no transposed (query-major) index
    )
    return FlexDecodePlan(mask)


def _inverse_tables(
    tables: torch.Tensor, ctx: torch.Tensor, block_size: int, num_blocks: int
) -> torch.Tensor:
    """[num_blocks + 1] int32: the table index j at which this step's sequences hold each block,
    -1 for blocks none holds (the last entry takes the tables' padding and is never read)."""
    j = torch.arange(tables.shape[1], device=tables.device)
    held = j[None, :] < (ctx[:, None] + block_size - 1) // block_size  # [B, W] real entries
    target = torch.where(held, tables, num_blocks)  # padding goes to the spare last entry
    logical = torch.full((num_blocks + 1,), -1, dtype=torch.int32, device=tables.device)
    source = j.to(torch.int32).expand_as(tables)
    return logical.scatter_(0, target.flatten(), source.flatten())


def _paged_mask(
    logical: torch.Tensor,
    tables: torch.Tensor,
    ctx: torch.Tensor,
    block_size: int,
    window: int | None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """mask_mod(b, h, q, slot): the row ``slot`` of the keys view is a K row of one of sequence
    b's blocks at a position its query sees (every query of a row sits at context_len - 1)."""

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, slot: torch.Tensor
    ) -> torch.Tensor:
        half = slot // block_size
        block = half // 2
        j = logical[block]
        owned = (half % 2 == 0) & (j >= 0) & (tables[b, j.clamp(min=0)] == block)
        pos = j * block_size + slot % block_size
        visible = owned & (pos < ctx[b])
        if window is not None:
            visible = visible & (pos >= ctx[b] - window)
        return visible

    return mask_mod


def flex_decode_attention(
    q: torch.Tensor, cache: torch.Tensor, plan: FlexDecodePlan, scale: float
) -> torch.Tensor:
    """One query per sequence against its pages, read in place.

    q: [B, heads, D]; cache: [num_blocks, 2, block_size, kv_heads, D] in q's dtype
    -> [B, heads, D]
    """
    batch, heads, head_dim = q.shape
    kv_heads = cache.shape[3]
    if cache.dtype != q.dtype:
        raise ValueError(
            f"flex decode reads the cache in place: it holds {cache.dtype}, not {q.dtype}"
        )
    # GQA as a query length: [B, kv_heads, group, D]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    attend = compiled_flex() if q.device.type == "cuda" else _paged_flex
    o = attend(grouped, cache, plan.block_mask, scale)
    return o.reshape(batch, heads, head_dim)


def _paged_flex(
    q: torch.Tensor, cache: torch.Tensor, mask: BlockMask, scale: float
) -> torch.Tensor:
    # q: [B, kv_heads, group, D]; cache: [num_blocks, 2, bs, kv_heads, D] -> [B, kv_heads, group, D]
    block_size, kv_heads, head_dim = cache.shape[2:]
    rows = cache.view(-1, kv_heads, head_dim)  # views, no copy: the cache read in place
    k = rows[:-block_size].transpose(0, 1)[None]  # [1, kv_heads, (2N - 1) * bs, D]
    v = rows[block_size:].transpose(0, 1)[None]
    out = flex_attention(q, k, v, block_mask=mask, scale=scale)
    assert isinstance(out, torch.Tensor)
    return out


@functools.cache
def compiled_flex(
    backend: str = "inductor",
) -> Callable[[torch.Tensor, torch.Tensor, BlockMask, float], torch.Tensor]:
    """The flex call compiled (inductor on CUDA: one Triton kernel), built on first use. Whole
    graph, static shapes: the decode kernel needs a static batch, and the runner pads batches
    to a few sizes, each compiled once; a step's new tables, lengths and mask closure reuse its
    size's compilation. Another backend (``aot_eager``) traces the same graph without a GPU."""
    allow_compiled_shapes(COMPILED_SHAPES)
    return torch.compile(_paged_flex, fullgraph=True, dynamic=False, backend=backend)
