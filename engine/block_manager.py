"""Paged KV-cache block accounting: which block ids each owner holds, which blocks several owners
share, and which cached blocks a new prompt can reuse. Pure Python, no tensors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pdserve.engine import block_audit
from pdserve.engine.free_runs import BlockManagerError as BlockManagerError  # re-exported
from pdserve.engine.free_runs import FreeRuns


class BlockManager:
    """Hands out fixed-size KV blocks (`block_size` tokens each) to owners identified by an int.

    Each owner holds an ordered block table: the block for token position `p` is
    `table[p // block_size]`. An owner's capacity (`num_tokens`) grows through `append`, shrinks
    through `truncate` (a speculative step's rejected slots), and `free` lets go of every block
    at once. Fresh blocks come from `FreeRuns`, which keeps
    a new owner's blocks one ascending run when it can, so its KV transfer lands in place.

    Prefix caching (``caching``): a full block whose KV is known gets the chained hash of its
    tokens (`engine.prefix_hash`) through `register`, and the index maps hash -> block. A block
    is then in exactly one of three states::

        referenced (refcount >= 1) ──free: last reference──▶ evictable (indexed, LRU order)
              ▲                                                  │  │
              └──── allocate: a prompt's leading hash hits ◀─────┘  │ a fresh block is needed
                                                                    ▼ and no free one is left
        free (no hash, in the runs) ◀──────────── evicted: its hash leaves the index

    `allocate` with the prompt's block hashes takes a reference on each leading block found in
    the index (shared, never written again) and fresh blocks for the rest. A block released
    by its last owner keeps its hash and stays findable until its memory is needed; evictable
    blocks go least recently released first (an owner's tail before its head, as vLLM). A hash
    already in the index is not indexed twice: the second block stays anonymous. Without
    caching no block is shared or indexed. A freed block may be handed out again at once: the
    decode worker defers a free while a transfer is still writing into it.
    """

    def __init__(self, num_blocks: int, block_size: int, caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is invalid: need at least 1 KV block")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} is invalid: need at least 1 token a block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free = FreeRuns(num_blocks)
        self._tables: dict[int, list[int]] = {}
        self._tokens: dict[int, int] = {}
        self._refs = [0] * num_blocks  # owners whose table holds the block
        self._hash_of: dict[int, int] = {}  # indexed block -> its hash
        self._block_of: dict[int, int] = {}  # the index: hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self._offered: dict[int, int] = {}  # owner -> leading blocks already offered to the index

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new owner can get: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, referenced or evictable."""
        return len(self._block_of)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by some owner, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens (ceil)."""
        _check_tokens(num_tokens)
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt with these block hashes are cached here."""
        return len(self._hits(hashes))

    def can_allocate(self, num_tokens: int, hashes: Sequence[int] = ()) -> bool:
        hits = self._hits(hashes)
        return self.blocks_for(num_tokens) - len(hits) <= self._available(hits)

    def allocate(self, owner: int, num_tokens: int, hashes: Sequence[int] = ()) -> list[int]:
        """Give a new owner blocks for `num_tokens` tokens; returns its block table. `hashes`:
        the block hashes of its leading full blocks; those cached are shared, not allocated."""
        if owner in self._tables:
            raise BlockManagerError(f"owner {owner} already holds blocks; free it first")
        if len(hashes) > self.blocks_for(num_tokens):
            raise ValueError(f"{len(hashes)} block hashes for only {num_tokens} tokens")
        hits = self._hits(hashes)
        needed = self.blocks_for(num_tokens) - len(hits)
        if needed > self._available(hits):
            raise BlockManagerError(
                f"owner {owner} needs {needed} blocks for {num_tokens} tokens but only "
                f"{self._available(hits)} are free; check can_allocate first"
            )
        for block in hits:
            self._evictable.pop(block, None)
            self._refs[block] += 1
        self._tables[owner] = hits + self._fresh(needed)
        self._tokens[owner] = num_tokens
        self._offered[owner] = len(hits)
        return list(self._tables[owner])

    def can_append(self, owner: int, num_tokens: int) -> bool:
        """Can `owner`'s table grow to hold `num_tokens` tokens in total?"""
        return self._extra_blocks(owner, num_tokens) <= self.num_free_blocks

    def append(self, owner: int, num_tokens: int) -> list[int]:
        """Grow `owner`'s table to hold `num_tokens` tokens in total; returns only the new blocks.

        Asking for less than the current capacity is a no-op (capacity never shrinks).
        """
        extra = self._extra_blocks(owner, num_tokens)
        if extra > self.num_free_blocks:
            raise BlockManagerError(
                f"owner {owner} needs {extra} more blocks to hold {num_tokens} tokens but only "
                f"{self.num_free_blocks} are free; check can_append first"
            )
        table = self._tables[owner]
        new_blocks = self._fresh(extra, after=table[-1] if table else None)
        table.extend(new_blocks)
        self._tokens[owner] = max(self._tokens[owner], num_tokens)
        return new_blocks

    def truncate(self, owner: int, num_tokens: int) -> int:
        """Shrink `owner`'s capacity to `num_tokens` tokens (no-op if it holds fewer), releasing
        the blocks past them; returns how many. Only unindexed tail blocks can be past the
        tokens an owner keeps (blocks are indexed once full of known KV), so they go free."""
        table = self._table(owner)
        if num_tokens >= self._tokens[owner]:
            return 0
        keep = self.blocks_for(num_tokens)
        tail = table[keep:]
        for block in tail:
            if self._refs[block] != 1 or block in self._hash_of:
                raise BlockManagerError(f"owner {owner}: block {block} is shared or indexed")
        del table[keep:]
        self._tokens[owner] = num_tokens
        for block in tail:
            self._refs[block] = 0
        self._free.put(tail[::-1])
        return len(tail)

    def free(self, owner: int) -> int:
        """Drop `owner`'s reference on each of its blocks; idempotent (an unknown owner frees
        0). A block nobody holds any more stays cached if it is indexed, else is free."""
        table = self._tables.pop(owner, None)
        if table is None:
            return 0
        del self._tokens[owner], self._offered[owner]
        released: list[int] = []
        for block in reversed(table):  # the tail becomes the least recently used
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    released.append(block)
        self._free.put(released)
        return len(table)

    def register(self, owner: int, hashes: Sequence[int]) -> int:
        """`owner`'s first ``len(hashes)`` blocks are full of known KV with these hashes: index
        them (a hash already indexed keeps its block; this one stays anonymous). Blocks offered
        before are skipped. Returns how many blocks joined the index."""
        table = self._table(owner)
        if len(hashes) > len(table):
            raise BlockManagerError(f"owner {owner}: {len(hashes)} hashes for {len(table)} blocks")
        if not self.caching:
            return 0
        added = 0
        for i in range(self._offered[owner], len(hashes)):
            block, h = table[i], hashes[i]
            known = self._hash_of.get(block)
            if known is not None and known != h:
                raise BlockManagerError(f"owner {owner}: block {block} is cached as another hash")
            if known is None and h not in self._block_of:
                self._hash_of[block], self._block_of[h] = h, block
                added += 1
        self._offered[owner] = max(self._offered[owner], len(hashes))
        return added

    def block_table(self, owner: int) -> list[int]:
        return list(self._table(owner))

    def num_tokens(self, owner: int) -> int:
        """Capacity asked for so far (the largest `num_tokens` given to allocate/append)."""
        self._table(owner)
        return self._tokens[owner]

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def owners(self) -> list[int]:
        return list(self._tables)

    def __contains__(self, owner: object) -> bool:
        return owner in self._tables

    def check_integrity(self) -> None:
        """Raise BlockManagerError if any block is lost, in two states, out of range or wrongly
        counted, if the hash index is not a bijection onto cached blocks, or if a table's length
        does not match its owner's capacity (`engine.block_audit`)."""
        block_audit.check_integrity(self)

    # -- internals --------------------------------------------------------------------------

    def _hits(self, hashes: Sequence[int]) -> list[int]:
        """The cached blocks of the leading `hashes` found in the index, in order."""
        if not self.caching:
            return []
        hits: list[int] = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def _available(self, hits: Sequence[int]) -> int:
        """Blocks fresh allocation may use once `hits` are referenced (no longer evictable)."""
        return self.num_free_blocks - sum(1 for b in hits if b in self._evictable)

    def _fresh(self, n: int, after: int | None = None) -> list[int]:
        """`n` blocks nobody holds, each with one reference; cached ones are evicted (least
        recently released first) only when the free runs fall short."""
        for _ in range(n - len(self._free)):
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self._free.put([block])
        blocks = self._free.take(n, after)
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def _table(self, owner: int) -> list[int]:
        table = self._tables.get(owner)
        if table is None:
            raise BlockManagerError(f"owner {owner} holds no blocks; allocate first")
        return table

    def _extra_blocks(self, owner: int, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(self._table(owner)))


def _check_tokens(num_tokens: int) -> None:
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} is invalid: must be >= 0")
