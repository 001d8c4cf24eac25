"""How much two workers on one CPU host slow each other down beyond sharing cores.

Each worker has a core of its own, yet they share the last-level cache and the memory bus: a
decode step (weights streamed from memory) runs slower while another core computes, and so
does a prefill. Processor sharing (`bench.plan.cpu_share`) does not see this, since no core is
oversubscribed. This module measures it with the real engine code: decode steps of a small
batch and prefills of a mid-sized prompt, each timed with a spawned neighbour process idle,
looping prefills, or looping decode steps on another core. The phases alternate round by round
(a shared machine drifts; a slowdown is taken within a round), and the slowdown of each pair is
the median over rounds. Their mean is the profile's `corun` (0.05 = a worker runs 5% slower with
one neighbour at work); the simulator applies it per busy neighbour. On GPUs each worker has its
own device and this is not measured.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch.multiprocessing as mp

from pdserve.bench.profile.timers import DecodeTimer, PrefillTimer, Target
from pdserve.engine.deploy_config import DeploymentConfig

DECODE_POINT = (4, 128)  # (batch, context): a small decode batch, weight-streaming bound
PREFILL_LENS = (256,)  # one mid-sized prompt: compute bound
KINDS = ("prefill", "decode")
IDLE = 0  # neighbour modes: 0 idle, 1 + KINDS.index(kind) looping that kind


class _Work:
    """The two measured operations on one loaded model, each returning its milliseconds."""

    def __init__(self, target: Target) -> None:
        self.prefill_timer = PrefillTimer(target, max(PREFILL_LENS), len(PREFILL_LENS))
        self.decode_timer = DecodeTimer(target, 4 * DECODE_POINT[0] * (DECODE_POINT[1] + 64))

    def run(self, kind: str) -> float:
        if kind == "prefill":
            return self.prefill_timer(list(PREFILL_LENS))
        batch, context = DECODE_POINT
        return statistics.median(ms for *_, ms in self.decode_timer(batch, context, 2))


def _neighbour(deployment: DeploymentConfig, mode: Any, ready: Any, stop: Any) -> None:
    """Child process: loop what `mode` says until told to stop."""
    work = _Work(Target.load(deployment))
    for kind in KINDS:
        work.run(kind)  # warm-up
    ready.set()
    while not stop.is_set():
        current = mode.value
        if current == IDLE:
            time.sleep(0.005)
        else:
            work.run(KINDS[current - 1])


def _timed(run: Callable[[], float], seconds: float) -> float:
    samples: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(samples) < 2:
        samples.append(run())
    return statistics.median(samples)


def measure_corun(target: Target, seconds: float = 1.0, rounds: int = 3) -> dict[str, float]:
    """Slowdowns "decode|prefill" (a decode step beside a looping prefill), "decode|decode",
    "prefill|decode", "prefill|prefill", each clamped at 0, and "corun", their mean."""
    work = _Work(target)
    for kind in KINDS:
        work.run(kind)  # warm-up
    ctx = mp.get_context("spawn")
    mode, ready, stop = ctx.Value("i", IDLE), ctx.Event(), ctx.Event()
    child = ctx.Process(target=_neighbour, args=(target.deployment, mode, ready, stop))
    child.start()
    ratios: dict[str, list[float]] = {}
    try:
        if not ready.wait(timeout=300):
            raise RuntimeError("the co-run neighbour process did not start")
        for _ in range(rounds):
            for measured in KINDS:
                times = {}
                for neighbour in (IDLE, 1, 2):
                    mode.value = neighbour
                    time.sleep(0.05)  # let the neighbour finish what it was doing
                    times[neighbour] = _timed(partial(work.run, measured), seconds)
                for i, kind in enumerate(KINDS, start=1):
                    ratios.setdefault(f"{measured}|{kind}", []).append(times[i] / times[IDLE])
    finally:
        stop.set()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    out = {pair: max(0.0, statistics.median(r) - 1.0) for pair, r in ratios.items()}
    out["corun"] = statistics.mean(out.values())
    return out
