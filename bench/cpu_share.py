"""Processor sharing of a CPU host's cores among the busy workers of a simulated deployment.

On GPUs every worker has its own device: an operation of `ms` takes `ms`. On one CPU host the
workers share its cores: with `busy` threads wanting to run (each busy worker's torch threads,
plus `background` cores of other load) on `cores` cores, each runs at min(1, cores / wanted)
of the speed it was profiled at, and the finishing times of every running operation move when
a worker starts or stops. The profile measured each piece alone, so on a CPU host whose workers
outnumber its cores this is what keeps the simulation from counting cores twice.

Cores are not independent either: they share the last-level cache and the memory bus, so a
worker computes slower while others compute beside it even with cores to spare. `corun` (the
profile's measured slowdown per busy neighbour, `bench.profile_corun`) divides the speed of
each worker operation by 1 + corun x (workers running beside it, at most cores - 1).
Operations started with `corun=False` (the controller's light streaming work) neither suffer
nor cause it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Op:
    remaining_ms: float  # work left, in ms at full speed
    threads: int
    done: Callable[[], None]
    corun: bool = True  # a worker's compute: slowed by, and slowing, the others
    version: int = 0
    speed: float = 1.0  # share of full speed it runs at now


class CpuShare:
    """Runs each worker's operations at its share of the cores (see module docstring)."""

    def __init__(
        self,
        clock: Callable[[], float],
        at: Callable[[float, Callable[[], None]], None],
        cores: float | None,
        background: float = 0.0,
        corun: float = 0.0,
    ) -> None:
        if cores is not None and not cores > 0:
            raise ValueError(f"cores must be > 0, got {cores}")
        if background < 0:
            raise ValueError(f"background cores must be >= 0, got {background}")
        if corun < 0:
            raise ValueError(f"the co-run slowdown must be >= 0, got {corun}")
        self._clock, self._at = clock, at
        self.cores, self.background, self.corun = cores, background, corun
        self._ops: dict[object, _Op] = {}
        self._versions = itertools.count(1)
        self._last = 0.0  # when remaining_ms was last brought up to date

    def speed(self) -> float:
        """Share of full speed each busy thread gets now from core sharing alone."""
        if self.cores is None:
            return 1.0
        wanted = sum(op.threads for op in self._ops.values()) + self.background
        return min(1.0, self.cores / wanted) if wanted > 0 else 1.0

    def worker_speed(self) -> float:
        """Share of full speed a worker's operation gets now: core sharing and co-running."""
        if self.cores is None:
            return 1.0
        workers = sum(1 for op in self._ops.values() if op.corun)
        neighbours = min(workers, self.cores) - 1
        return self.speed() / (1.0 + self.corun * max(0.0, neighbours))

    def run(
        self,
        owner: object,
        ms: float,
        threads: int,
        done: Callable[[], None],
        corun: bool = True,
    ) -> None:
        """Start `owner`'s operation of `ms` at full speed; `done()` once it has finished."""
        now = self._clock()
        if self.cores is None:  # a device of its own: nothing to share
            self._at(now + ms * 1e-3, done)
            return
        assert owner not in self._ops, "one operation per worker at a time"
        self._advance(now)
        self._ops[owner] = _Op(ms, threads, done, corun)
        self._reschedule()

    def _advance(self, now: float) -> None:
        elapsed_ms = (now - self._last) * 1e3
        for op in self._ops.values():
            op.remaining_ms = max(0.0, op.remaining_ms - elapsed_ms * op.speed)
        self._last = now

    def _reschedule(self) -> None:
        shared, worker = self.speed(), self.worker_speed()
        for owner, op in self._ops.items():
            op.speed = worker if op.corun else shared
            # versions are unique across ops: a stale event of an owner's earlier operation
            # must never match its next one
            op.version = next(self._versions)
            t = self._last + op.remaining_ms / op.speed * 1e-3
            self._at(t, lambda owner=owner, v=op.version: self._finish(owner, v))  # type: ignore[misc]

    def _finish(self, owner: object, version: int) -> None:
        op = self._ops.get(owner)
        if op is None or op.version != version:
            return  # superseded: the speed changed after this event was scheduled
        self._advance(self._clock())
        del self._ops[owner]
        self._reschedule()
        op.done()
