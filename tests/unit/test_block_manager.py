"""BlockManager: paired verbs, capacity accounting, run-keeping reuse, and the self-check."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from pdserve.engine.block_manager import BlockManager, BlockManagerError


def create_manager(num_blocks: int = 8, block_size: int = 4) -> BlockManager:
    return BlockManager(num_blocks=num_blocks, block_size=block_size)


def test_blocks_for_rounds_up() -> None:
    bm = create_manager(block_size=4)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_gives_distinct_blocks_and_updates_counts() -> None:
    bm = create_manager(num_blocks=8, block_size=4)
    a = bm.allocate(1, 9)  # 3 blocks
    b = bm.allocate(2, 4)  # 1 block
    assert len(a) == 3 and len(b) == 1 and not set(a) & set(b)
    assert bm.block_table(1) == a and bm.num_tokens(1) == 9
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (4, 4, 0.5)
    assert sorted(bm.owners()) == [1, 2] and 1 in bm and 3 not in bm
    bm.check_integrity()


def test_allocate_refuses_duplicate_owner_and_overflow_without_side_effects() -> None:
    bm = create_manager(num_blocks=4, block_size=4)
    bm.allocate(1, 4)
    with pytest.raises(BlockManagerError, match="already holds"):
        bm.allocate(1, 4)
    assert not bm.can_allocate(13)
    with pytest.raises(BlockManagerError, match="free"):
        bm.allocate(2, 13)
    assert 2 not in bm and bm.num_free_blocks == 3
    bm.check_integrity()


def test_append_returns_only_new_blocks_and_never_shrinks() -> None:
    bm = create_manager(num_blocks=4, block_size=4)
    first = bm.allocate(1, 3)
    assert bm.append(1, 4) == []  # still fits the first block
    new = bm.append(1, 5)
    assert len(new) == 1 and bm.block_table(1) == first + new
    assert bm.append(1, 2) == [] and bm.num_tokens(1) == 5
    assert bm.can_append(1, 16) and not bm.can_append(1, 17)
    with pytest.raises(BlockManagerError):
        bm.append(1, 17)
    assert bm.block_table(1) == first + new
    bm.check_integrity()


def test_unknown_owner_is_an_error_except_for_free() -> None:
    bm = create_manager()
    for call in (bm.block_table, bm.num_tokens, lambda o: bm.append(o, 1)):
        with pytest.raises(BlockManagerError, match="allocate first"):
            call(7)
    assert bm.free(7) == 0


def test_free_is_idempotent_and_merges_runs() -> None:
    bm = create_manager(num_blocks=4, block_size=1)
    assert bm.allocate(1, 2) == [0, 1]
    assert bm.allocate(2, 1) == [2]
    assert bm.free(1) == 2 and bm.free(1) == 0
    assert bm.free(2) == 1
    # 0-1, 2 and the never-used 3 merged back into one run
    assert bm.allocate(3, 4) == [0, 1, 2, 3]
    bm.check_integrity()


def runs(table: list[int]) -> int:
    """How many ascending runs of consecutive ids a block table is made of."""
    return 1 + sum(b != a + 1 for a, b in itertools.pairwise(table)) if table else 0


def test_allocation_takes_the_smallest_run_that_fits() -> None:
    bm = create_manager(num_blocks=16, block_size=1)
    for owner, n in enumerate((2, 3, 4, 7)):
        bm.allocate(owner, n)  # 0-1, 2-4, 5-8, 9-15
    bm.free(0)
    bm.free(2)  # free runs: 0-1 (2 blocks) and 5-8 (4 blocks)
    assert bm.allocate(10, 2) == [0, 1]  # exact fit, the 4-run stays whole
    assert bm.allocate(11, 3) == [5, 6, 7]
    bm.check_integrity()


def test_allocation_that_fits_no_run_uses_the_largest_runs_first() -> None:
    bm = create_manager(num_blocks=10, block_size=1)
    for owner in range(10):
        bm.allocate(owner, 1)
    for owner in (0, 2, 3, 5, 6, 7):
        bm.free(owner)  # free runs: 0, 2-3, 5-7
    assert bm.allocate(20, 5) == [5, 6, 7, 2, 3]
    bm.check_integrity()


def test_append_extends_the_last_block_in_place_when_it_can() -> None:
    bm = create_manager(num_blocks=8, block_size=2)
    bm.allocate(1, 2)  # block 0
    bm.allocate(2, 2)  # block 1
    bm.free(2)
    assert bm.append(1, 4) == [1]  # right after block 0
    assert bm.append(1, 6) == [2]
    bm.allocate(3, 2)  # block 3
    assert bm.append(1, 8) == [4]  # 3 is taken: the smallest free run (4-7 is the only one)
    bm.check_integrity()


def test_tables_stay_contiguous_under_churn() -> None:
    """Prompts come and go while decode sequences grow a block at a time: new prompts still get
    one run almost always (measured: 97% here; a FIFO free list gave 1%)."""
    rng = random.Random(1)
    bm = create_manager(num_blocks=512, block_size=16)
    live: dict[int, int] = {}
    single_run = allocations = 0
    for owner in range(2000):
        while bm.num_free_blocks < 128 and live:  # keep the cache about 75% full
            victim = rng.choice(list(live))
            bm.free(victim)
            del live[victim]
        if live and rng.random() < 0.45:
            victim = rng.choice(list(live))
            bm.free(victim)
            del live[victim]
        tokens = rng.randint(16, 600)
        if bm.can_allocate(tokens):
            table = bm.allocate(owner, tokens)
            live[owner] = tokens
            allocations += 1
            single_run += runs(table) == 1
        for other in rng.sample(list(live), min(4, len(live))):  # decode growth
            live[other] += 16
            if bm.can_append(other, live[other]):
                bm.append(other, live[other])
            else:
                live[other] -= 16
    bm.check_integrity()
    assert single_run / allocations > 0.9


def test_zero_token_allocation_holds_an_empty_table() -> None:
    bm = create_manager()
    assert bm.allocate(1, 0) == [] and 1 in bm
    assert len(bm.append(1, 1)) == 1
    bm.check_integrity()


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    with pytest.raises(ValueError, match="num_tokens"):
        create_manager().allocate(1, -1)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda bm: bm._free._add_run(bm._tables[1][0], 1), "free and referenced"),
        (lambda bm: bm._free._cut(3, 1), "neither free, cached nor owned"),
        (lambda bm: bm._free._run_ends.clear(), "free-run index"),
        (lambda bm: bm._free._runs.__setitem__(3, 4), "free-run index"),
        (lambda bm: bm._tables[1].append(99), "out of range"),
        (lambda bm: bm._tokens.__setitem__(1, 1), "expected 1"),
        (lambda bm: bm._tables[2].append(bm._tables[1][0]), "refcount 1 but 2 holders"),
        (lambda bm: bm._tables[1].append(bm._tables[1][0]), "holds a block twice"),
    ],
)
def test_check_integrity_catches_corruption(
    corrupt: Callable[[BlockManager], object], message: str
) -> None:
    bm = create_manager(num_blocks=8, block_size=4)
    bm.allocate(1, 8)
    bm.allocate(2, 1)
    bm.check_integrity()
    corrupt(bm)
    with pytest.raises(BlockManagerError, match=message):
        bm.check_integrity()


def test_random_operations_keep_integrity() -> None:
    rng = random.Random(0)
    bm = create_manager(num_blocks=32, block_size=4)
    for _ in range(3000):
        owner, tokens = rng.randrange(12), rng.randrange(0, 40)
        op = rng.choice(("allocate", "append", "free"))
        if op == "allocate" and owner not in bm and bm.can_allocate(tokens):
            assert len(bm.allocate(owner, tokens)) == bm.blocks_for(tokens)
        elif op == "append" and owner in bm and bm.can_append(owner, tokens):
            before = bm.num_free_blocks
            new = bm.append(owner, tokens)
            assert bm.num_free_blocks == before - len(new)
        elif op == "free":
            held = len(bm.block_table(owner)) if owner in bm else 0
            assert bm.free(owner) == held
        bm.check_integrity()
        assert bm.num_free_blocks + sum(len(bm.block_table(o)) for o in bm.owners()) == 32
