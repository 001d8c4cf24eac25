"""Paged KV-cache block accounting: which block ids each owner holds. Pure Python, no tensors."""

from __future__ import annotations

from collections.abc import Iterator


class BlockManagerError(RuntimeError):
    """A block request that cannot be honoured (unknown/duplicate owner, no room) or a broken
    invariant found by `check_integrity`."""


class BlockManager:
    """Hands out fixed-size KV blocks (`block_size` tokens each) to owners identified by an int.

    Each owner holds an ordered block table: the block for token position `p` is
    `table[p // block_size]`. An owner's capacity (`num_tokens`) only grows, through `append`,
    until `free` returns every block at once.

    Free blocks are kept as runs of consecutive ids, merged with their neighbours on free, so a
    new owner usually gets one ascending run: a KV transfer into such a table lands straight in
    the cache with no staging copy (see `kv_transfer.receiver`). `allocate` takes the smallest
    run that fits whole (best fit keeps the big runs for big prompts), else the largest runs
    first; `append` (decode growth, a block at a time) extends the owner's last block in place
    when the next id is free, else takes from the smallest run. A freed block may be handed out
    again at once: the decode worker defers a free while a transfer is still writing into it.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is invalid: need at least 1 KV block")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} is invalid: need at least 1 token a block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._runs: dict[int, int] = {0: num_blocks}  # free runs: start -> length
        self._run_ends: dict[int, int] = {num_blocks: 0}  # free runs: end (exclusive) -> start
        self._num_free = num_blocks
        self._tables: dict[int, list[int]] = {}
        self._tokens: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._num_free

    @property
    def usage(self) -> float:
        """Share of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens (ceil)."""
        _check_tokens(num_tokens)
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self._num_free

    def allocate(self, owner: int, num_tokens: int) -> list[int]:
        """Give a new owner blocks for `num_tokens` tokens; returns its block table."""
        if owner in self._tables:
            raise BlockManagerError(f"owner {owner} already holds blocks; free it first")
        needed = self.blocks_for(num_tokens)
        if needed > self._num_free:
            raise BlockManagerError(
                f"owner {owner} needs {needed} blocks for {num_tokens} tokens but only "
                f"{self._num_free} are free; check can_allocate first"
            )
        self._tables[owner] = self._take(needed)
        self._tokens[owner] = num_tokens
        return list(self._tables[owner])

    def can_append(self, owner: int, num_tokens: int) -> bool:
        """Can `owner`'s table grow to hold `num_tokens` tokens in total?"""
        return self._extra_blocks(owner, num_tokens) <= self._num_free

    def append(self, owner: int, num_tokens: int) -> list[int]:
        """Grow `owner`'s table to hold `num_tokens` tokens in total; returns only the new blocks.

        Asking for less than the current capacity is a no-op (capacity never shrinks).
        """
        extra = self._extra_blocks(owner, num_tokens)
        if extra > self._num_free:
            raise BlockManagerError(
                f"owner {owner} needs {extra} more blocks to hold {num_tokens} tokens but only "
                f"{self._num_free} are free; check can_append first"
            )
        table = self._tables[owner]
        new_blocks = self._take(extra, after=table[-1] if table else None)
        table.extend(new_blocks)
        self._tokens[owner] = max(self._tokens[owner], num_tokens)
        return new_blocks

    def free(self, owner: int) -> int:
        """Return all of `owner`'s blocks; idempotent (an unknown owner frees 0)."""
        table = self._tables.pop(owner, None)
        if table is None:
            return 0
        del self._tokens[owner]
        for start, length in _runs_of(sorted(table)):
            self._add_run(start, length)
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
        if len(self._runs) != len(self._run_ends) or any(
            self._run_ends.get(start + length) != start for start, length in self._runs.items()
        ):
            raise BlockManagerError("the free-run index is inconsistent")
        for start, length in self._runs.items():
            if length < 1 or start + length in self._runs:
                raise BlockManagerError(f"free run at block {start} is empty or not merged")
            for block in range(start, start + length):
                self._claim(seen, block, "the free list")
        if sum(self._runs.values()) != self._num_free:
            raise BlockManagerError("the free-block count disagrees with the free runs")
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

    def _take(self, n: int, after: int | None = None) -> list[int]:
        """`n` free blocks, as few runs as possible; first the ones right `after` a block."""
        taken: list[int] = []
        if after is not None and after + 1 in self._runs:
            taken += self._cut(after + 1, n)
        while len(taken) < n:
            want = n - len(taken)
            fits = [(length, start) for start, length in self._runs.items() if length >= want]
            if fits:  # best fit: the smallest run that holds the rest
                start = min(fits)[1]
            else:  # nothing holds it whole: the largest run, then the next
                start = max(self._runs.items(), key=lambda run: (run[1], -run[0]))[0]
            taken += self._cut(start, want)
        return taken

    def _cut(self, start: int, n: int) -> list[int]:
        """Take up to `n` blocks from the front of the free run at `start`."""
        length = self._runs.pop(start)
        del self._run_ends[start + length]
        k = min(n, length)
        if k < length:
            self._runs[start + k] = length - k
            self._run_ends[start + length] = start + k
        self._num_free -= k
        return list(range(start, start + k))

    def _add_run(self, start: int, length: int) -> None:
        """Return the free run [start, start + length), merged with free neighbours."""
        self._num_free += length
        end = start + length
        left = self._run_ends.pop(start, None)
        if left is not None:  # a free run ends where this one starts
            del self._runs[left]
            start = left
        right_len = self._runs.pop(end, None)
        if right_len is not None:  # a free run starts where this one ends
            del self._run_ends[end + right_len]
            end += right_len
        self._runs[start] = end - start
        self._run_ends[end] = start


def _check_tokens(num_tokens: int) -> None:
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} is invalid: must be >= 0")


def _runs_of(blocks: list[int]) -> Iterator[tuple[int, int]]:
    """(start, length) of each run of consecutive ids in sorted `blocks`."""
    start = prev = blocks[0] if blocks else 0
    for block in blocks[1:]:
        if block != prev + 1:
            yield start, prev + 1 - start
            start = block
        prev = block
    if blocks:
        yield start, prev + 1 - start
