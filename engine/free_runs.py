"""The free KV blocks of a `BlockManager`, kept as runs of consecutive ids. Pure Python."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class BlockManagerError(RuntimeError):
    """A block request that cannot be honoured (unknown/duplicate owner, no room) or a broken
    invariant found by `check_integrity` (of the block manager or its free runs)."""


class FreeRuns:
    """Free block ids as runs of consecutive ids, merged with their neighbours on `put`, so a
    new owner usually gets one ascending run: a KV transfer into such a table lands straight in
    the cache with no staging copy (see `kv_transfer.receiver`). `take` cuts the smallest run
    that fits whole (best fit keeps the big runs for big prompts), else the largest runs first;
    given `after`, it first extends a table in place when the next id is free."""

    def __init__(self, num_blocks: int) -> None:
        self._runs: dict[int, int] = {0: num_blocks}  # start -> length
        self._run_ends: dict[int, int] = {num_blocks: 0}  # end (exclusive) -> start
        self._count = num_blocks

    def __len__(self) -> int:
        return self._count

    def blocks(self) -> Iterator[int]:
        for start, length in self._runs.items():
            yield from range(start, start + length)

    def take(self, n: int, after: int | None = None) -> list[int]:
        """`n` free blocks (the caller checked there are), as few runs as possible; first the
        ones right `after` a block."""
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

    def put(self, blocks: Iterable[int]) -> None:
        """Return blocks to the free runs, merged with their free neighbours."""
        for start, length in _runs_of(sorted(blocks)):
            self._add_run(start, length)

    def check_integrity(self) -> None:
        """Raise BlockManagerError if the run index is inconsistent or a run is not merged."""
        if len(self._runs) != len(self._run_ends) or any(
            self._run_ends.get(start + length) != start for start, length in self._runs.items()
        ):
            raise BlockManagerError("the free-run index is inconsistent")
        for start, length in self._runs.items():
            if length < 1 or start + length in self._runs:
                raise BlockManagerError(f"free run at block {start} is empty or not merged")
        if sum(self._runs.values()) != self._count:
            raise BlockManagerError("the free-block count disagrees with the free runs")

    def _cut(self, start: int, n: int) -> list[int]:
        """Take up to `n` blocks from the front of the free run at `start`."""
        length = self._runs.pop(start)
        del self._run_ends[start + length]
        k = min(n, length)
        if k < length:
            self._runs[start + k] = length - k
            self._run_ends[start + length] = start + k
        self._count -= k
        return list(range(start, start + k))

    def _add_run(self, start: int, length: int) -> None:
        """Return the free run [start, start + length), merged with free neighbours."""
        self._count += length
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
