"""Where KV goes on the wire and where it lands: the block layout from a packed prefill batch
to a decode replica's paged cache, in place or staged, whole or at a head offset."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine.kv_cache import kv_rows
from pdserve.kv_transfer.descriptor import TransferItem
from pdserve.kv_transfer.layout import (
    pack_layer,
    run_start,
    token_ranges,
    wire_blocks,
    wire_plan,
    write_layer,
)


def item(n: int, blocks: tuple[int, ...], tid: int = 1) -> TransferItem:
    return TransferItem(tid, f"r{tid}", n, blocks)


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([item(16, (3, 4, 5, 6))], 3),  # one run; unused trailing blocks do not matter
        ([item(5, (2, 3))], 2),
        ([item(5, (3, 2))], None),  # 5 tokens need 2 blocks, out of order
        ([item(4, (3, 2))], 3),  # 4 tokens need only block 3
        ([item(8, (0, 1)), item(4, (2,), 2)], 0),  # items' blocks back to back
        ([item(6, (0, 1)), item(4, (2,), 2)], 0),  # a partial last block is fine now
        ([item(8, (0, 1)), item(4, (5,), 2)], None),
        ([item(9, (0,))], None),  # does not fit
        ([], None),
    ],
)
def test_run_start(items: list[TransferItem], expected: int | None) -> None:
    assert run_start(items, 4) == expected


def test_run_start_agrees_with_the_wire_blocks() -> None:
    rng = random.Random(0)
    for _ in range(500):
        items, next_block = [], rng.randint(0, 5)
        for tid in range(rng.randint(1, 3)):
            n = rng.randint(1, 12)
            blocks = list(range(next_block, next_block + -(-n // 4)))
            if rng.random() < 0.3:
                rng.shuffle(blocks)
            next_block = (blocks[-1] if blocks else next_block) + rng.choice([1, 1, 2])
            items.append(item(n, tuple(blocks), tid))
        blocks, keep = wire_blocks(items, 4)
        assert bool(keep.all())
        first = int(blocks[0])
        one_run = torch.equal(blocks, torch.arange(first, first + blocks.numel()))
        assert run_start(items, 4) == (first if one_run else None), items


def _cache_tokens(cache: torch.Tensor, slots: torch.Tensor, bs: int) -> torch.Tensor:
    """K and V of the given slots from a layer cache [N, 2, bs, h, D]: [2, T, h, D]."""
    flat = cache.view(-1, *cache.shape[3:])
    rows = kv_rows(slots, bs)
    return torch.stack([flat[rows], flat[rows + bs]])


@pytest.mark.parametrize("heads", [(0, 4), (2, 4)])  # every head (in place) / a TP slice
@pytest.mark.parametrize("staged", [False, True])
def test_packed_layer_lands_in_the_right_slots(heads: tuple[int, int], staged: bool) -> None:
    bs, h_all, d = 4, 4, 3
    lens = [5, 8, 3]  # items of a packed batch; two go to this destination
    ranges = token_ranges(lens)
    k, v = torch.randn(2, sum(lens), heads[1] - heads[0], d).unbind(0)
    mine = [0, 2]
    plan = wire_plan([ranges[i] for i in mine], bs)
    wire = pack_layer(k, v, plan)
    assert wire.shape == (2 + 1, 2, bs, heads[1] - heads[0], d)
    assert torch.equal(wire[1, :, 1:], torch.zeros(2, 3, heads[1] - heads[0], d))  # padding
    tables = [(7, 8), (9,)] if not staged else [(9, 3), (5,)]
    items = [item(lens[i], t, i) for i, t in zip(mine, tables)]
    cache = torch.zeros(12, 2, bs, h_all, d)
    blocks, _ = wire_blocks(items, bs)
    start = run_start(items, bs)
    if not staged and heads == (0, h_all):
        assert start == 7
        cache[start : start + plan.num_blocks] = wire  # what the in-place receive does
    else:
        write_layer(cache, wire, blocks, heads[0])
    for i, table in zip(mine, tables):
        s, e = ranges[i]
        pos = torch.arange(e - s)
        slots = torch.tensor(table)[pos // bs] * bs + pos % bs
        got = _cache_tokens(cache, slots, bs)[:, :, heads[0] : heads[1]]
        assert torch.equal(got, torch.stack([k[s:e], v[s:e]]))
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[blocks] = False
    assert not cache[untouched].any()  # nothing written outside the items' blocks


def test_refused_items_are_not_written() -> None:
    bs = 4
    items = [item(5, (0, 1), 1), item(3, (2,), 2)]
    blocks, keep = wire_blocks(items, bs, keep=[False, True])
    assert keep.tolist() == [False, False, True]
    cache = torch.zeros(4, 2, bs, 1, 1)
    write_layer(cache, torch.ones(3, 2, bs, 1, 1), blocks, 0, keep)
    assert not cache[:2].any() and bool(cache[2].all())


def test_pack_takes_strided_views() -> None:
    """The model hands the hook slices of its fused qkv output; packing copies them once."""
    qkv = torch.randn(10, 3, 2, 4)  # [T, q/k/v, heads, D]
    k, v = qkv[:, 1], qkv[:, 2]
    wire = pack_layer(k, v, wire_plan([(0, 10)], 4))  # 3 blocks, the last one half used
    assert torch.equal(_cache_tokens(wire, torch.arange(10), 4), torch.stack([k, v]))
    assert not wire[2, :, 2:].any()


def test_many_items_pack_the_same_as_few() -> None:
    lens = [3, 4, 9, 1, 5, 8, 2, 7, 6, 4, 11]  # > _PER_ITEM_MAX items to one destination
    ranges = token_ranges(lens)
    k, v = torch.randn(2, sum(lens), 2, 3).unbind(0)
    everything = pack_layer(k, v, wire_plan(ranges, 4))
    one_by_one = torch.cat([pack_layer(k, v, wire_plan([r], 4)) for r in ranges])
    assert torch.equal(everything, one_by_one)
