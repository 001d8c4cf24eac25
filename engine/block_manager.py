"""Paged KV-cache block accounting: which block ids each owner holds. Pure Python, no tensors."""

from __future__ import annotations

from collections import deque


class BlockManagerError(RuntimeError):
    """A block request that cannot be honoured (unknown/duplicate owner, no room) or a broken
    invariant found by `check_integrity`."""


class BlockManager:
    """Hands out fixed-size KV blocks (`block_size` tokens each) to owners identified by an int.

    Each owner holds an ordered block table: the block for token position `p` is
    `table[p // block_size]`. An owner's capacity (`num_tokens`) only grows, through `append`,
    until `free` returns every block at once.

    The free list is FIFO: a freed block goes to the back of the queue and is handed out again as
    late as possible, so a late write into a freed block (a transfer for an aborted request still
    landing) is unlikely to hit a block that a live owner already holds.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is invalid: need at least 1 KV block")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} is invalid: need at least 1 token a block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[int, list[int]] = {}
        self._tokens: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens (ceil)."""
        _check_tokens(num_tokens)
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, owner: int, num_tokens: int) -> list[int]:
        """Give a new owner blocks for `num_tokens` tokens; returns its block table."""
        if owner in self._tables:
            raise BlockManagerError(f"owner {owner} already holds blocks; free it first")
        needed = self.blocks_for(num_tokens)
        if needed > len(self._free):
            raise BlockManagerError(
                f"owner {owner} needs {needed} blocks for {num_tokens} tokens but only "
                f"{len(self._free)} are free; check can_allocate first"
            )
        self._tables[owner] = self._take(needed)
        self._tokens[owner] = num_tokens
        return list(self._tables[owner])

    def can_append(self, owner: int, num_tokens: int) -> bool:
        """Can `owner`'s table grow to hold `num_tokens` tokens in total?"""
        return self._extra_blocks(owner, num_tokens) <= len(self._free)

    def append(self, owner: int, num_tokens: int) -> list[int]:
        """Grow `owner`'s table to hold `num_tokens` tokens in total; returns only the new blocks.

        Asking for less than the current capacity is a no-op (capacity never shrinks).
        """
        extra = self._extra_blocks(owner, num_tokens)
        if extra > len(self._free):
            raise BlockManagerError(
                f"owner {owner} needs {extra} more blocks to hold {num_tokens} tokens but only "
                f"{len(self._free)} are free; check can_append first"
            )
        new_blocks = self._take(extra)
        self._tables[owner].extend(new_blocks)
        self._tokens[owner] = max(self._tokens[owner], num_tokens)
        return new_blocks

    def free(self, owner: int) -> int:
        """Return all of `owner`'s blocks; idempotent (an unknown owner frees 0)."""
        table = self._tables.pop(owner, None)
        if table is None:
            return 0
        del self._tokens[owner]
        self._free.extend(table)
        return len(table)

    def block_table(self, owner: int) -> list[int]:
        return list(self._table(owner))

    def num_tokens(self, owner: int) -> int:
        """Capacity asked for so far (the largest `num_tokens` given to allocate/append)."""
        self._table(owner)
        return self._tokens[owner]

    def owners(self) -> list[int]:
        return list(self._tables)

    def __contains__(self, owner: object) -> bool:
        return owner in self._tables

    def check_integrity(self) -> None:
        """Raise BlockManagerError if any block is lost, shared, duplicated or out of range, or if
        a table's length does not match its owner's capacity."""
        seen: dict[int, str] = {}
        for block in self._free:
            self._claim(seen, block, "the free list")
        for owner, table in self._tables.items():
            for block in table:
                self._claim(seen, block, f"owner {owner}")
        if len(seen) != self.num_blocks:
            lost = sorted(set(range(self.num_blocks)) - set(seen))
            raise BlockManagerError(f"blocks {lost[:10]} are neither free nor owned")
        if self._tables.keys() != self._tokens.keys():
            raise BlockManagerError("owner tables and token counts disagree on the set of owners")
        for owner, table in self._tables.items():
            want = self.blocks_for(self._tokens[owner])
            if len(table) != want:
                raise BlockManagerError(
                    f"owner {owner} holds {len(table)} blocks for {self._tokens[owner]} tokens; "
                    f"expected {want}"
                )

    def _claim(self, seen: dict[int, str], block: int, holder: str) -> None:
        if not 0 <= block < self.num_blocks:
            raise BlockManagerError(f"block {block} held by {holder} is out of range")
        if block in seen:
            raise BlockManagerError(f"block {block} is held by both {seen[block]} and {holder}")
        seen[block] = holder

    def _table(self, owner: int) -> list[int]:
        table = self._tables.get(owner)
        if table is None:
            raise BlockManagerError(f"owner {owner} holds no blocks; allocate first")
        return table

    def _extra_blocks(self, owner: int, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(self._table(owner)))

    def _take(self, n: int) -> list[int]:
        return [self._free.popleft() for _ in range(n)]


def _check_tokens(num_tokens: int) -> None:
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} is invalid: must be >= 0")
