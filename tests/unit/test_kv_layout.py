"""Where received KV lands: the in-place test on block ids agrees with the per-token slots."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.kv_transfer.descriptor import TransferItem
from pdserve.kv_transfer.layout import run_start, slot_index


def item(n: int, blocks: tuple[int, ...], tid: int = 1) -> TransferItem:
    return TransferItem(tid, f"r{tid}", n, blocks)


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([item(16, (3, 4, 5, 6))], 12),  # one run; unused trailing blocks do not matter
        ([item(5, (2, 3))], 8),
        ([item(5, (3, 2))], None),  # 5 tokens need 2 blocks, out of order
        ([item(4, (3, 2))], 12),  # 4 tokens need only block 3
        ([item(8, (0, 1)), item(4, (2,), 2)], 0),  # items back to back, blocks full
        ([item(6, (0, 1)), item(4, (2,), 2)], None),  # the first leaves a gap in block 1
        ([item(8, (0, 1)), item(4, (5,), 2)], None),
        ([item(9, (0,))], None),  # does not fit
        ([], None),
    ],
)
def test_run_start(items: list[TransferItem], expected: int | None) -> None:
    assert run_start(items, 4) == expected


def test_run_start_agrees_with_the_slots() -> None:
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
        slots = slot_index(items, 4)
        start = int(slots[0])
        one_run = torch.equal(slots, torch.arange(start, start + slots.numel()))
        assert run_start(items, 4) == (start if one_run else None), items
