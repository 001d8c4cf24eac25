"""BlockManager with prefix caching: shared blocks and their refcounts, the hash index, LRU
eviction only when memory is needed, run-keeping for the fresh part, and the self-check."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pdserve.engine.block_manager import BlockManager, BlockManagerError
from pdserve.engine.prefix_hash import block_hashes, hash_salt

BS = 4
SALT = hash_salt("tiny", "float32", BS)


def hashes(tokens: list[int]) -> list[int]:
    return block_hashes(tokens, BS, SALT)


def cached(num_blocks: int = 16) -> BlockManager:
    return BlockManager(num_blocks, BS, caching=True)


def hold(bm: BlockManager, owner: int, tokens: list[int]) -> list[int]:
    """Allocate with lookup, then register the full blocks (their KV is known)."""
    table = bm.allocate(owner, len(tokens), hashes(tokens))
    bm.register(owner, hashes(tokens))
    bm.check_integrity()
    return table


PREFIX = list(range(100, 108))  # two full blocks


def test_a_prompt_sharing_a_prefix_takes_references_instead_of_new_blocks() -> None:
    bm = cached()
    a = hold(bm, 1, [*PREFIX, 1, 2, 3, 4, 5])  # 2 shared-to-be + 1 full + 1 partial
    assert bm.num_cached_blocks == 3 and bm.num_used_blocks == 4
    b_tokens = [*PREFIX, 9, 9, 9, 9, 9, 9]
    assert bm.cached_prefix(hashes(b_tokens)) == 2
    b = hold(bm, 2, b_tokens)
    assert b[:2] == a[:2] and not set(b[2:]) & set(a)
    assert [bm.ref_count(x) for x in b] == [2, 2, 1, 1]
    assert bm.num_used_blocks == 6  # a shared block is counted once
    # each owner lets go of its references exactly once; the second free is a no-op
    assert bm.free(1) == 4 and bm.free(1) == 0
    assert [bm.ref_count(x) for x in b] == [1, 1, 1, 1]
    bm.check_integrity()
    bm.free(2)
    assert bm.num_free_blocks == 16 and bm.num_used_blocks == 0
    assert bm.num_cached_blocks == 4 == bm.num_evictable_blocks  # 2 shared + a's and b's third
    bm.check_integrity()


def test_released_blocks_stay_findable_until_reused() -> None:
    bm = cached()
    first = hold(bm, 1, PREFIX)
    bm.free(1)
    assert bm.cached_prefix(hashes(PREFIX)) == 2 and bm.num_free_blocks == 16
    assert hold(bm, 2, [*PREFIX, 7])[:2] == first
    assert bm.num_evictable_blocks == 0  # referenced again


def test_a_hash_already_indexed_is_not_indexed_twice() -> None:
    bm = cached()
    a = bm.allocate(1, 8, hashes(PREFIX))  # both before either registered: no hits
    b = bm.allocate(2, 8, hashes(PREFIX))
    assert not set(a) & set(b)
    assert bm.register(1, hashes(PREFIX)) == 2
    assert bm.register(2, hashes(PREFIX)) == 0  # duplicates stay anonymous
    bm.free(2)
    assert bm.num_evictable_blocks == 0 and bm.num_free_blocks == 14  # b's went straight back
    bm.free(1)
    assert bm.num_evictable_blocks == 2 and bm.cached_prefix(hashes(PREFIX)) == 2
    bm.check_integrity()


def test_cached_blocks_are_evicted_only_when_needed_least_recently_released_first() -> None:
    bm = cached(num_blocks=6)
    prompts = {o: [o * 10 + i for i in range(8)] for o in (1, 2, 3)}  # 2 full blocks each
    tables = {o: hold(bm, o, p) for o, p in prompts.items()}
    for owner in (2, 1, 3):  # release order: 2's blocks are the least recently released
        bm.free(owner)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 6
    bm.allocate(9, 1)  # one fresh block: evicts exactly one, the tail of the oldest release
    assert bm.block_table(9) == [tables[2][1]] and bm.num_cached_blocks == 5
    assert bm.cached_prefix(hashes(prompts[2])) == 1
    # a hit refreshes recency: 2's head, reused and released, is now the most recent
    hold(bm, 8, prompts[2][:4])
    bm.free(8)
    bm.allocate(10, 12)  # three more: 1's tail, 1's head, 3's tail
    assert sorted(bm.block_table(10)) == sorted([*tables[1], tables[3][1]])
    assert [bm.cached_prefix(hashes(prompts[o])) for o in (1, 2, 3)] == [0, 1, 1]
    bm.check_integrity()


def test_free_blocks_go_before_cached_ones() -> None:
    bm = cached(num_blocks=8)
    hold(bm, 1, PREFIX)
    bm.free(1)
    bm.allocate(2, 6 * BS)  # exactly the never-used blocks
    assert bm.num_cached_blocks == 2 and bm.cached_prefix(hashes(PREFIX)) == 2
    assert bm.can_allocate(8, hashes(PREFIX))  # all hits, nothing fresh needed
    assert not bm.can_allocate(9, hashes(PREFIX))  # the hits pin both: no block for the 9th
    assert bm.can_allocate(8)  # without the hits both cached blocks may be evicted for it
    bm.check_integrity()


def test_the_fresh_part_is_one_ascending_run() -> None:
    bm = cached(num_blocks=32)
    hold(bm, 1, PREFIX)
    for owner in range(2, 6):  # fragment the free space: 2-block holes between holders
        bm.allocate(owner, 2 * BS)
    bm.free(3)
    table = bm.allocate(9, 4 * BS + 2, hashes([*PREFIX, *range(50, 60)]))
    assert table[:2] == bm.block_table(1)
    fresh = table[2:]
    assert fresh == list(range(fresh[0], fresh[0] + 3))  # the hole of 2 was skipped
    bm.check_integrity()


def test_without_caching_hashes_are_ignored() -> None:
    bm = BlockManager(8, BS)
    a = bm.allocate(1, 8, hashes(PREFIX))
    assert bm.register(1, hashes(PREFIX)) == 0 and bm.num_cached_blocks == 0
    bm.free(1)
    assert bm.cached_prefix(hashes(PREFIX)) == 0
    assert bm.allocate(2, 8, hashes(PREFIX)) == a  # fresh blocks, as ever
    bm.check_integrity()


def _two_sharing() -> BlockManager:
    bm = cached(num_blocks=8)
    hold(bm, 1, [*PREFIX, 1, 1, 1, 1])
    hold(bm, 2, [*PREFIX, 2])
    bm.free(1)  # its third block is evictable now, the first two stay held by 2
    return bm


def _shared(bm: BlockManager) -> int:
    return bm.block_table(2)[0]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda bm: bm._refs.__setitem__(_shared(bm), 2), "refcount 2 but 1 holders"),
        (lambda bm: bm._tables[2].pop(0), "refcount 1 but 0 holders"),
        (lambda bm: bm._block_of.__setitem__(bm._hash_of[_shared(bm)], 7), "hash index"),
        (lambda bm: bm._hash_of.pop(_shared(bm)), "hash index"),
        (lambda bm: bm._evictable.__setitem__(_shared(bm), None), "evictable and referenced"),
        (lambda bm: bm._evictable.popitem(), "neither free, cached nor owned"),
        (lambda bm: bm._free.put([next(iter(bm._evictable))]), "free and evictable"),
    ],
)
def test_check_integrity_catches_a_corrupted_refcount_or_index(
    corrupt: Callable[[BlockManager], object], message: str
) -> None:
    bm = _two_sharing()
    bm.check_integrity()
    corrupt(bm)
    with pytest.raises(BlockManagerError, match=message):
        bm.check_integrity()


def test_random_sharing_keeps_integrity() -> None:
    """Prompts from a few shared prefixes come, register, grow and go; every count and the
    index stay consistent and nothing leaks."""
    rng = random.Random(0)
    bm = cached(num_blocks=24)
    prefixes = [[p * 1000 + i for i in range(3 * BS)] for p in range(3)]
    live: dict[int, list[int]] = {}
    for owner in range(3000):
        if live and rng.random() < 0.5:
            victim = rng.choice(list(live))
            assert bm.free(victim) == bm.blocks_for(len(live[victim]))
            del live[victim]
        tokens = rng.choice(prefixes)[: rng.randrange(1, 3 * BS)] + [owner] * rng.randrange(6)
        if tokens and bm.can_allocate(len(tokens), hashes(tokens)):
            bm.allocate(owner, len(tokens), hashes(tokens))
            live[owner] = tokens
            if rng.random() < 0.8:  # its KV landed
                bm.register(owner, hashes(tokens))
        for other in rng.sample(list(live), min(2, len(live))):  # decode growth
            if bm.can_append(other, len(live[other]) + 1):
                live[other].append(rng.randrange(5))
                bm.append(other, len(live[other]))
        bm.check_integrity()
    for owner in list(live):
        bm.free(owner)
    assert bm.num_free_blocks == 24
    bm.check_integrity()
