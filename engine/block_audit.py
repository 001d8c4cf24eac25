"""The integrity audit of a `BlockManager` (`BlockManager.check_integrity`): its refcounts, the
three block states, the hash index and the owners' tables checked against one another. Pure
Python; it reads the manager's bookkeeping and changes nothing."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TYPE_CHECKING

from pdserve.engine.free_runs import BlockManagerError

if TYPE_CHECKING:  # annotations only: block_manager imports this module
    from pdserve.engine.block_manager import BlockManager


def check_integrity(bm: BlockManager) -> None:
    """Raise BlockManagerError if any block is lost, in two states, out of range or wrongly
    counted, if the hash index is not a bijection onto cached blocks, or if a table's length
    does not match its owner's capacity."""
    bm._free.check_integrity()
    holders = _holders(bm)
    free, evictable = set(bm._free.blocks()), set(bm._evictable)
    for block in range(bm.num_blocks):
        if bm._refs[block] != holders[block]:
            raise BlockManagerError(
                f"block {block} has refcount {bm._refs[block]} but {holders[block]} holders"
            )
    states = [("free", free), ("evictable", evictable), ("referenced", set(holders))]
    for (a, one), (b, other) in itertools.combinations(states, 2):
        if one & other:
            raise BlockManagerError(f"blocks {sorted(one & other)[:10]} are {a} and {b}")
    if len(free) + len(evictable) + len(holders) != bm.num_blocks:
        lost = sorted(set(range(bm.num_blocks)) - free - evictable - set(holders))
        raise BlockManagerError(f"blocks {lost[:10]} are neither free, cached nor owned")
    _check_index(bm, free, evictable)
    _check_owners(bm)


def _holders(bm: BlockManager) -> Counter[int]:
    """How many owners' tables hold each block (checked: in range, once per table)."""
    holders: Counter[int] = Counter()
    for owner, table in bm._tables.items():
        if len(set(table)) != len(table):
            raise BlockManagerError(f"owner {owner} holds a block twice")
        for block in table:
            if not 0 <= block < bm.num_blocks:
                raise BlockManagerError(f"block {block} held by owner {owner} is out of range")
            holders[block] += 1
    return holders


def _check_index(bm: BlockManager, free: set[int], evictable: set[int]) -> None:
    if len(bm._block_of) != len(bm._hash_of) or any(
        bm._hash_of.get(block) != h for h, block in bm._block_of.items()
    ):
        raise BlockManagerError("the hash index and the blocks' hashes disagree")
    if not evictable <= bm._hash_of.keys() or free & bm._hash_of.keys():
        raise BlockManagerError("an evictable block is not indexed, or a free block is")
    if not bm.caching and (bm._hash_of or max(bm._refs) > 1):
        raise BlockManagerError("prefix caching is off but blocks are indexed or shared")


def _check_owners(bm: BlockManager) -> None:
    if not bm._tables.keys() == bm._tokens.keys() == bm._offered.keys():
        raise BlockManagerError("owner tables and token counts disagree on the set of owners")
    for owner, table in bm._tables.items():
        want = bm.blocks_for(bm._tokens[owner])
        if len(table) != want:
            raise BlockManagerError(
                f"owner {owner} holds {len(table)} blocks for {bm._tokens[owner]} tokens; "
                f"expected {want}"
            )
        if bm._offered[owner] > len(table):
            raise BlockManagerError(f"owner {owner} offered more blocks than it holds")
