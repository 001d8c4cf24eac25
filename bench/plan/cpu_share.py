"""Processor sharing of a CPU host's cores among the busy workers of a simulated deployment.

On GPUs every worker has its own device: an operation of `ms` takes `ms`. On one CPU host the
workers share its cores: with `busy` threads wanting to run (each busy worker's torch threads,
plus `background` cores of other load) on `cores` cores, each runs at min(1, cores / wanted)
of the speed it was profiled at, and the finishing times of every running operation move when
a worker starts or stops. The profile measured each piece alone, so on a CPU host whose workers
outnumber its cores this is what keeps the simulation from counting cores twice.

Cores are not independent either: they share the last-level cache and the memory bus, so a
worker computes slower while others compute beside it even with cores to spare. `corun` (the
profile's measured slowdowns, `bench.profile.corun`) divides the speed of each worker operation
by 1 + the sum of its slowdowns beside the workers running with it (at most cores - 1 of them,
the worst first). It is one number for every pair, or a slowdown per "kind|neighbour kind"
pair ("decode|prefill": a decode step beside a prefill). Operations of kind None (the
controller's light streaming work) neither suffer nor cause it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass
class _Op:
    remaining_ms: float  # work left, in ms at full speed
    threads: int
    done: Callable[[], None]
    kind: str | None = "worker"  # a worker's compute ("prefill", "decode"); None: light work
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
        corun: float | Mapping[str, float] = 0.0,
    ) -> None:
        if cores is not None and not cores > 0:
            raise ValueError(f"cores must be > 0, got {cores}")
        if background < 0:
            raise ValueError(f"background cores must be >= 0, got {background}")
        values = corun.values() if isinstance(corun, Mapping) else [corun]
        if any(v < 0 for v in values):
            raise ValueError(f"co-run slowdowns must be >= 0, got {corun}")
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

    def slowdown(self, kind: str, neighbour: str) -> float:
        """How much slower an operation of `kind` runs beside one of `neighbour`."""
        if not isinstance(self.corun, Mapping):
            return self.corun
        default = sum(self.corun.values()) / len(self.corun) if self.corun else 0.0
        return self.corun.get(f"{kind}|{neighbour}", default)

    def _worker_speed(self, op: _Op, shared: float) -> float:
        """Share of full speed a worker's operation gets now: core sharing and co-running."""
        assert self.cores is not None and op.kind is not None
        others = [o.kind for o in self._ops.values() if o is not op and o.kind is not None]
        beside = sorted((self.slowdown(op.kind, k) for k in others), reverse=True)
        return shared / (1.0 + sum(beside[: max(0, int(self.cores) - 1)]))

    def run(
        self,
        owner: object,
        ms: float,
        threads: int,
        done: Callable[[], None],
        kind: str | None = "worker",
    ) -> None:
        """Start `owner`'s operation of `ms` at full speed; `done()` once it has finished."""
        now = self._clock()
        if self.cores is None:  # a device of its own: nothing to share
            self._at(now + ms * 1e-3, done)
            return
        assert owner not in self._ops, "one operation per worker at a time"
        self._advance(now)
        self._ops[owner] = _Op(ms, threads, done, kind)
        self._reschedule()

    def _advance(self, now: float) -> None:
        elapsed_ms = (now - self._last) * 1e3
        for op in self._ops.values():
            op.remaining_ms = max(0.0, op.remaining_ms - elapsed_ms * op.speed)
        self._last = now

    def _reschedule(self) -> None:
        shared = self.speed()
        for op in self._ops.values():
            op.speed = shared if op.kind is None else self._worker_speed(op, shared)
        for owner, op in self._ops.items():
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


class StreamCpu:
    """The controller's and the client's CPU per streamed token (measured by the profile), as
    one more thread wanting a core; only on a CPU host, where it competes with the workers."""

    def __init__(self, cpu: CpuShare, ms_per_token: float) -> None:
        self.cpu, self.ms_per_token = cpu, ms_per_token
        self._pending_ms, self._running = 0.0, False

    def add(self, tokens: int) -> None:
        if self.cpu.cores is None or self.ms_per_token <= 0:
            return
        self._pending_ms += tokens * self.ms_per_token
        if not self._running:
            self._start()

    def _start(self) -> None:
        ms, self._pending_ms, self._running = self._pending_ms, 0.0, True
        self.cpu.run(self, ms, 1, self._done, kind=None)  # light on memory: no co-run term

    def _done(self) -> None:
        self._running = False
        if self._pending_ms > 0:
            self._start()
