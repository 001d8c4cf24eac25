"""Arrival processes: when each request of a benchmark is sent, in seconds from its start.

Inter-arrival gaps are gamma distributed with shape = burstiness and mean 1 / rate (vLLM's
model): burstiness 1 is a Poisson process (exponential gaps), below 1 burstier (coefficient of
variation 1/sqrt(burstiness) > 1), above 1 more regular, and infinity a fixed interval.
An infinite rate sends everything at t = 0. Seeded: the same seed gives the same schedule.

In a closed-loop workload (multi-turn) only the requests that open a conversation follow the
process; a later turn is sent when the answer before it is back (`request_arrivals`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times of n requests at `rate` req/s; the first one lands after one gap."""
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        rng = np.random.default_rng(seed)
        # gamma(k, theta): mean k * theta = 1 / rate, variance k * theta^2 = 1 / (k * rate^2)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return [float(t) for t in np.cumsum(gaps)]


def request_arrivals(
    follows: Sequence[int | None], rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Send times of requests of which those with a `follows` index wait for that answer
    instead (0 here; the sender times them). The others arrive at rate x openers / requests,
    so the offered request rate is `rate` when answers come back quickly."""
    openers = [i for i, f in enumerate(follows) if f is None]
    if len(openers) == len(follows):
        return arrival_times(len(follows), rate, burstiness, seed)
    share = len(openers) / len(follows)
    out = [0.0] * len(follows)
    for i, t in zip(openers, arrival_times(len(openers), rate * share, burstiness, seed)):
        out[i] = t
    return out


def replay_times(timestamps_s: Sequence[float], speedup: float = 1.0) -> list[float]:
    """A trace's own arrival times, shifted to start at 0 and compressed `speedup` times."""
    if not speedup > 0 or math.isinf(speedup):
        raise ValueError(f"trace speedup must be a finite number > 0, got {speedup}")
    if not timestamps_s:
        return []
    t0 = timestamps_s[0]
    return [(t - t0) / speedup for t in timestamps_s]
