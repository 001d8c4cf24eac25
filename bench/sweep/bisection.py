"""Find the highest request rate whose SLO attainment meets a target.

Shared by `pdserve sweep` (each probe is a real benchmark run) and `pdserve plan` (each probe is
a simulation), so both search the same way. Attainment is assumed to fall as the rate rises;
probes that contradict that (noise) are kept in the record but never move the answer above a
rate that failed.

The search is driven from outside, so async callers can await each probe::

    search = RateBisection(lo=0.5, hi=8.0, target=0.9)
    while (rate := search.next_rate()) is not None:
        search.record(rate, measure(rate))
    search.result().best_rate

or in one call for synchronous probes: ``bisect_rate(measure, lo=0.5, hi=8.0)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BisectionError", "BisectionResult", "Probe", "RateBisection", "bisect_rate"]


class BisectionError(ValueError):
    """The search range or settings are unusable; the message says what to write instead."""


@dataclass(frozen=True)
class Probe:
    rate: float  # requests/s
    attainment: float  # share of requests meeting the SLOs, 0..1
    meets: bool  # attainment >= target


@dataclass(frozen=True)
class BisectionResult:
    best_rate: float  # highest probed rate that met the target; 0.0 if none did
    probes: tuple[Probe, ...]  # in the order they were run
    bracket: tuple[float, float | None]  # (highest passing rate, lowest failing rate or None)

    @property
    def saturated(self) -> bool:
        """True when even the top of the range met the target: the answer is a lower bound."""
        return self.bracket[1] is None and self.best_rate > 0


class RateBisection:
    """Probe `hi`, then `lo`, then geometric midpoints of the bracket until it is `rel_tol` wide.

    Geometric midpoints because rate ranges span orders of magnitude: between 0.1 and 10 req/s
    the first midpoint is 1, not 5.
    """

    def __init__(
        self,
        lo: float,
        hi: float,
        target: float = 0.9,
        *,
        rel_tol: float = 0.1,
        max_probes: int = 8,
    ) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise BisectionError(f"rate range must satisfy 0 < lo < hi, got lo={lo}, hi={hi}")
        if not 0 < target <= 1:
            raise BisectionError(f"attainment target must be in (0, 1], got {target}")
        if rel_tol <= 0:
            raise BisectionError(f"rel_tol must be > 0, got {rel_tol}")
        if max_probes < 2:
            raise BisectionError(f"max_probes must be >= 2 (the two ends), got {max_probes}")
        self.lo, self.hi, self.target = lo, hi, target
        self.rel_tol, self.max_probes = rel_tol, max_probes
        self._probes: list[Probe] = []
        self._good: float | None = None  # highest passing rate below every failure
        self._bad: float | None = None  # lowest failing rate

    def next_rate(self) -> float | None:
        """The next rate to measure, or None when the search is done."""
        n = len(self._probes)
        if n == 0:
            return self.hi
        if n >= self.max_probes:
            return None
        if self._bad is None:  # the top passed: nothing above it to find
            return None
        if self._good is None:
            return self.lo if not any(p.rate == self.lo for p in self._probes) else None
        if self._bad - self._good <= self.rel_tol * self._good:
            return None
        return math.sqrt(self._good * self._bad)

    def record(self, rate: float, attainment: float) -> Probe:
        if not 0 <= attainment <= 1:
            raise BisectionError(f"attainment must be in [0, 1], got {attainment}")
        probe = Probe(rate, attainment, attainment >= self.target)
        self._probes.append(probe)
        if probe.meets:
            if self._bad is None or rate < self._bad:
                self._good = max(self._good or 0.0, rate)
        else:
            self._bad = rate if self._bad is None else min(self._bad, rate)
            if self._good is not None and self._good >= rate:
                # noise: a lower rate passed, this one failed; the answer is the best pass below
                passing = [p.rate for p in self._probes if p.meets and p.rate < rate]
                self._good = max(passing) if passing else None
        return probe

    def result(self) -> BisectionResult:
        best = self._good or 0.0
        return BisectionResult(best, tuple(self._probes), (best, self._bad))


def bisect_rate(
    evaluate: Callable[[float], float],
    lo: float,
    hi: float,
    target: float = 0.9,
    *,
    rel_tol: float = 0.1,
    max_probes: int = 8,
) -> BisectionResult:
    """Run the whole search with a synchronous `evaluate(rate) -> attainment`."""
    search = RateBisection(lo, hi, target, rel_tol=rel_tol, max_probes=max_probes)
    while (rate := search.next_rate()) is not None:
        search.record(rate, evaluate(rate))
    return search.result()
