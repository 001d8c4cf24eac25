"""How much two workers on one CPU host slow each other down beyond sharing cores.

Each worker has a core of its own, yet they share the last-level cache and the memory bus: a
decode step (weights streamed from memory) runs slower while another core computes a prefill,
and the other way round. Processor sharing (`bench.cpu_share`) does not see this, since no
core is oversubscribed. This module measures it with the real engine code: decode steps of a
small batch and prefills of a mid-sized prompt are timed alone, then each again while a spawned
process loops the other one on another core. The slowdown, averaged over the two, is the
profile's `corun` (0.05 = each runs 5% slower with one neighbour at work); the simulator applies
it per busy neighbour. On GPUs each worker has its own device and this is not measured.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from pdserve.bench.profile_timers import DecodeTimer, PrefillTimer, Target
from pdserve.engine.spec import EngineSpec

DECODE_POINT = (4, 128)  # (batch, context): a small decode batch, weight-streaming bound
PREFILL_LENS = (256,)  # one mid-sized prompt: compute bound


class _Work:
    """The two measured operations on one loaded model, each returning its milliseconds."""

    def __init__(self, target: Target) -> None:
        self.prefill_timer = PrefillTimer(target, max(PREFILL_LENS), len(PREFILL_LENS))
        self.decode_timer = DecodeTimer(target, 4 * DECODE_POINT[0] * (DECODE_POINT[1] + 64))

    def prefill(self) -> float:
        return self.prefill_timer(list(PREFILL_LENS))

    def decode(self) -> float:
        batch, context = DECODE_POINT
        return statistics.median(ms for *_, ms in self.decode_timer(batch, context, 4))


def _neighbour(engine: EngineSpec, kind: str, ready: Any, stop: Any) -> None:
    """Child process: loop `kind` ("prefill" or "decode") until told to stop."""
    work = _Work(Target.load(engine))
    run = work.prefill if kind == "prefill" else work.decode
    run()  # warm-up
    ready.set()
    while not stop.is_set():
        run()


def _timed(run: Callable[[], float], seconds: float) -> float:
    samples: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(samples) < 3:
        samples.append(run())
    return statistics.median(samples)


def measure_corun(target: Target, seconds: float = 4.0) -> dict[str, float]:
    """{"decode": slowdown, "prefill": slowdown, "corun": their mean}, each clamped at 0."""
    work = _Work(target)
    work.prefill(), work.decode()  # warm-up
    ctx = mp.get_context("spawn")
    out: dict[str, float] = {}
    for measured, other in (("decode", "prefill"), ("prefill", "decode")):
        run = work.decode if measured == "decode" else work.prefill
        alone = _timed(run, seconds)
        ready, stop = ctx.Event(), ctx.Event()
        child = ctx.Process(target=_neighbour, args=(target.engine, other, ready, stop))
        child.start()
        try:
            if not ready.wait(timeout=300):
                raise RuntimeError("the co-run neighbour process did not start")
            shared = _timed(run, seconds)
        finally:
            stop.set()
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
        out[measured] = max(0.0, shared / alone - 1.0)
    out["corun"] = (out["decode"] + out["prefill"]) / 2
    return out
