"""Mapping KV between a prefill rank's packed batch and a decode replica's paged blocks.

Prefill rank r of a TP group holds KV heads ``kv_head_range(H, r, tp)`` of the full model and
sends exactly that slice; the decode replica (TP=1, all H heads) writes it at that head offset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.kv_transfer.descriptor import TransferItem


def token_ranges(seq_lens: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each sequence in a packed batch."""
    out, start = [], 0
    for n in seq_lens:
        out.append((start, start + n))
        start += n
    return out


def pack_layer(
    k: torch.Tensor, v: torch.Tensor, ranges: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the given token ranges of a packed batch, as the two wire tensors of a layer.

    k, v: [T, heads, head_dim] -> two [sum(range lengths), heads, head_dim]; no copy when the
    ranges cover the whole batch (one destination), which is the common case.
    """
    if len(ranges) == 1 and ranges[0] == (0, k.shape[0]):
        return k.contiguous(), v.contiguous()
    index = torch.cat([torch.arange(s, e) for s, e in ranges]).to(k.device)
    return k.index_select(0, index), v.index_select(0, index)


def slot_index(items: Sequence[TransferItem], block_size: int) -> torch.Tensor:
    """Cache slot of every transferred token, items back to back: [sum(num_tokens)] int64."""
    slots = []
    for item in items:
        pos = torch.arange(item.num_tokens)
        blocks = torch.tensor(item.block_ids, dtype=torch.int64)
        if len(item.block_ids) * block_size < item.num_tokens:
            raise ValueError(
                f"transfer {item.transfer_id}: {item.num_tokens} tokens do not fit "
                f"{len(item.block_ids)} blocks of {block_size}"
            )
        slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    return torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64)


def run_start(items: Sequence[TransferItem], block_size: int) -> int | None:
    """The first cache slot when the items' tokens, back to back, fill one ascending run of
    slots (the KV can land in place), else None. Pure Python on the block ids: cheap enough to
    run before any receive is posted."""
    start = expected = None
    for item in items:
        if item.num_tokens == 0:
            continue
        needed = -(-item.num_tokens // block_size)
        blocks = item.block_ids[:needed]
        if len(blocks) < needed:
            return None
        first = blocks[0] * block_size
        if expected is not None and first != expected:
            return None
        if any(b != blocks[0] + i for i, b in enumerate(blocks)):
            return None
        start = first if start is None else start
        expected = first + item.num_tokens  # the next item must start right here
    return start


def write_layer(
    layer_cache: torch.Tensor,
    data: torch.Tensor,
    slots: torch.Tensor,
    head_start: int,
    keep: torch.Tensor | None = None,
) -> None:
    """Scatter one received layer into the paged cache at the link's head offset.

    layer_cache: [2, num_blocks, block_size, heads, head_dim]; data: [2, T, h, head_dim];
    slots: [T]; keep: optional [T] bool mask of tokens to write (others are dropped).
    """
    flat = layer_cache.view(2, -1, layer_cache.shape[-2], layer_cache.shape[-1])
    data = data.to(flat.device, flat.dtype)
    if keep is not None:
        data, slots = data[:, keep], slots[keep]
    heads = slice(head_start, head_start + data.shape[2])
    slots = slots.to(flat.device)
    flat[0, slots, heads] = data[0]
    flat[1, slots, heads] = data[1]
