"""Processor sharing of a CPU host's cores among the busy workers of a simulated deployment.

On GPUs every worker has its own device: an operation of `ms` takes `ms`. On one CPU host the
workers share its cores: with `busy` threads wanting to run (each busy worker's torch threads,
plus `background` cores of other load) on `cores` cores, each runs at min(1, cores / wanted)
of the speed it was profiled at, and the finishing times of every running operation move when
a worker starts or stops. The profile measured each piece alone, so on a CPU host whose workers
outnumber its cores this is what keeps the simulation from counting cores twice.
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
    version: int = 0


class CpuShare:
    """Runs each worker's operations at its share of the cores (see module docstring)."""

    def __init__(
        self,
        clock: Callable[[], float],
        at: Callable[[float, Callable[[], None]], None],
        cores: float | None,
        background: float = 0.0,
    ) -> None:
        if cores is not None and not cores > 0:
            raise ValueError(f"cores must be > 0, got {cores}")
        if background < 0:
            raise ValueError(f"background cores must be >= 0, got {background}")
        self._clock, self._at = clock, at
        self.cores, self.background = cores, background
        self._ops: dict[object, _Op] = {}
        self._versions = itertools.count(1)
        self._last = 0.0  # when remaining_ms was last brought up to date
        self._speed = 1.0

    def speed(self) -> float:
        """Share of full speed each busy thread gets now."""
        if self.cores is None:
            return 1.0
        wanted = sum(op.threads for op in self._ops.values()) + self.background
        return min(1.0, self.cores / wanted) if wanted > 0 else 1.0

    def run(self, owner: object, ms: float, threads: int, done: Callable[[], None]) -> None:
        """Start `owner`'s operation of `ms` at full speed; `done()` once it has finished."""
        now = self._clock()
        if self.cores is None:  # a device of its own: nothing to share
            self._at(now + ms * 1e-3, done)
            return
        assert owner not in self._ops, "one operation per worker at a time"
        self._advance(now)
        self._ops[owner] = _Op(ms, threads, done)
        self._reschedule()

    def _advance(self, now: float) -> None:
        elapsed_ms = (now - self._last) * 1e3
        for op in self._ops.values():
            op.remaining_ms = max(0.0, op.remaining_ms - elapsed_ms * self._speed)
        self._last = now

    def _reschedule(self) -> None:
        self._speed = self.speed()
        for owner, op in self._ops.items():
            # versions are unique across ops: a stale event of an owner's earlier operation
            # must never match its next one
            op.version = next(self._versions)
            t = self._last + op.remaining_ms / self._speed * 1e-3
            self._at(t, lambda owner=owner, v=op.version: self._finish(owner, v))  # type: ignore[misc]

    def _finish(self, owner: object, version: int) -> None:
        op = self._ops.get(owner)
        if op is None or op.version != version:
            return  # superseded: the speed changed after this event was scheduled
        self._advance(self._clock())
        del self._ops[owner]
        self._reschedule()
        op.done()
