"""Mapping KV between a prefill rank's packed batch and a decode replica's paged blocks.

Prefill rank r of a TP group holds KV heads ``kv_head_range(H, r, tp)`` of the full model and
sends exactly that slice; the decode replica (TP=1, all H heads) writes it at that head offset.

On the wire, one layer of a transfer is one tensor in the cache's block layout and storage
format, [blocks, 2 (K, V), block_size, heads, row]: each item's tokens fill its blocks in order
(the unused tail of an item's last block is sent as zeros), items back to back. When the
destination blocks of all items form one ascending run and the link carries every head, that
tensor is exactly the cache region ``cache[layer, first:first + blocks]``, and the receive lands
there with no copy.

In a scaled format (int8, fp8) a row is head_dim one-byte codes then its float16 scale,
quantized on the prefill rank exactly as the decode cache's own writes do (``to_cache_rows``):
the K/V shrink on the wire as in the cache, still one message per layer, still landing in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.kv_quant import movable
from pdserve.kv_transfer.descriptor import TransferItem


def token_ranges(seq_lens: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each sequence in a packed batch."""
    out, start = [], 0
    for n in seq_lens:
        out.append((start, start + n))
        start += n
    return out


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


# Up to this many items, pack_layer copies each item's blocks straight from the forward's K/V
# (two strided copies per item and K/V); beyond it, one gather and one strided copy per K/V.
_PER_ITEM_MAX = 8


@dataclass(frozen=True)
class WirePlan:
    """Where one destination's tokens go in a layer's wire tensor, worked out once per batch."""

    num_blocks: int
    block_size: int
    # per item: (its first token in the batch, its tokens, its first block in the wire tensor)
    items: tuple[tuple[int, int, int], ...]
    gather: torch.Tensor  # [num_blocks * block_size] batch token per wire position (tails: any)
    pad_rows: torch.Tensor  # K and V rows of the unused block tails (in the wire's
    # [blocks * 2 * block_size, h, D] view), sent as zeros


def wire_plan(ranges: Sequence[tuple[int, int]], block_size: int) -> WirePlan:
    """The plan for the items at ``ranges`` (their tokens' [start, end) in a packed batch)."""
    bs = block_size
    items, gather, pad_rows = [], [], []
    first = 0  # the item's first block in the wire tensor
    for start, end in ranges:
        n, blocks = end - start, blocks_for(end - start, bs)
        items.append((start, n, first))
        gather.append(torch.arange(start, start + blocks * bs).clamp(max=max(end - 1, 0)))
        if n % bs:
            tail = torch.arange(n % bs, bs)
            last = (first + blocks - 1) * 2 * bs
            pad_rows += [last + tail, last + bs + tail]
        first += blocks
    empty = torch.empty(0, dtype=torch.int64)
    return WirePlan(
        num_blocks=first,
        block_size=bs,
        items=tuple(items),
        gather=torch.cat(gather) if gather else empty,
        pad_rows=torch.cat(pad_rows) if pad_rows else empty,
    )


def pack_layer(k: torch.Tensor, v: torch.Tensor, plan: WirePlan) -> torch.Tensor:
    """K and V rows of one layer ([T, heads, row] each in the cache's format, any strides:
    ``to_cache_rows`` of the forward's K/V) as the wire tensor
    [plan.num_blocks, 2, block_size, heads, row]."""
    dtype = k.dtype
    k, v = movable(k), movable(v)  # float8 as uint8: CPU has no float8 index_fill_
    heads, head_dim, bs = k.shape[1], k.shape[2], plan.block_size
    wire = k.new_empty(plan.num_blocks, 2, bs, heads, head_dim)
    if len(plan.items) <= _PER_ITEM_MAX:
        for start, n, first in plan.items:
            full, tail = divmod(n, bs)
            for kv, x in enumerate((k, v)):
                if full:
                    wire[first : first + full, kv] = x[start : start + full * bs].view(
                        full, bs, heads, head_dim
                    )
                if tail:
                    wire[first + full, kv, :tail] = x[start + full * bs : start + n]
    else:  # many small items: gather them block-padded, then one strided copy each
        index = plan.gather.to(k.device)
        for kv, x in enumerate((k, v)):
            wire[:, kv] = x.index_select(0, index).view(-1, bs, heads, head_dim)
    if plan.pad_rows.numel():
        wire.view(-1, heads, head_dim).index_fill_(0, plan.pad_rows.to(k.device), 0)
    return wire.view(dtype)


def run_start(items: Sequence[TransferItem], block_size: int) -> int | None:
    """The first destination block when the blocks the items' tokens need, items in order, form
    one ascending run (the wire tensor lands in place), else None. Pure Python on the block
    ids: cheap enough to run before any receive is posted."""
    start = expected = None
    for item in items:
        needed = blocks_for(item.num_tokens, block_size)
        blocks = item.block_ids[:needed]
        if len(blocks) < needed:
            return None
        for b in blocks:
            if expected is not None and b != expected:
                return None
            start = b if start is None else start
            expected = b + 1
    return start


def wire_blocks(
    items: Sequence[TransferItem], block_size: int, keep: Sequence[bool] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per wire block: its destination block id, and whether to write it (its item is kept)."""
    blocks: list[int] = []
    kept: list[bool] = []
    for i, item in enumerate(items):
        needed = blocks_for(item.num_tokens, block_size)
        if len(item.block_ids) < needed:
            raise ValueError(
                f"transfer {item.transfer_id}: {item.num_tokens} tokens do not fit "
                f"{len(item.block_ids)} blocks of {block_size}"
            )
        blocks += item.block_ids[:needed]
        kept += [True if keep is None else keep[i]] * needed
    return torch.tensor(blocks, dtype=torch.int64), torch.tensor(kept, dtype=torch.bool)


def write_layer(
    layer_cache: torch.Tensor,
    data: torch.Tensor,
    blocks: torch.Tensor,
    head_start: int,
    keep: torch.Tensor | None = None,
) -> None:
    """Write one received layer into the paged cache at the link's head offset.

    layer_cache: [num_blocks, 2, block_size, heads, row]; data: [n, 2, block_size, h, row]
    (the wire tensor, in the cache's format); blocks: [n] destination block of each; keep:
    optional [n] bool mask of blocks to write (the others are dropped).
    """
    if data.dtype != layer_cache.dtype:
        raise ValueError(f"KV arrived as {data.dtype}, the cache stores {layer_cache.dtype}")
    data = data.to(layer_cache.device)
    if keep is not None:
        data, blocks = data[keep], blocks[keep]
    target = layer_cache.narrow(3, head_start, data.shape[3])  # a view: writes land in the cache
    movable(target).index_copy_(0, blocks.to(layer_cache.device), movable(data))
