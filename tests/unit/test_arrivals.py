"""Arrival processes: rate, burstiness, seeding, trace replay."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdserve.bench.serve.arrivals import arrival_times, replay_times


def gaps(times: list[float]) -> np.ndarray:
    return np.diff(np.concatenate([[0.0], times]))


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_mean_rate_holds_whatever_the_burstiness(burstiness: float) -> None:
    times = arrival_times(20_000, rate=5.0, burstiness=burstiness, seed=1)
    assert len(times) == 20_000
    assert 20_000 / times[-1] == pytest.approx(5.0, rel=0.03)


@pytest.mark.parametrize(("burstiness", "cv"), [(0.25, 2.0), (1.0, 1.0), (4.0, 0.5)])
def test_burstiness_sets_the_spread_of_gaps(burstiness: float, cv: float) -> None:
    # gamma with shape k: coefficient of variation 1 / sqrt(k); Poisson (k = 1) has CV 1
    g = gaps(arrival_times(20_000, rate=5.0, burstiness=burstiness, seed=2))
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.05)


def test_times_are_sorted_and_positive() -> None:
    times = arrival_times(1000, rate=10.0, seed=3)
    assert times[0] > 0
    assert times == sorted(times)


def test_infinite_rate_sends_everything_at_zero() -> None:
    assert arrival_times(5, rate=math.inf, burstiness=0.5) == [0.0] * 5


def test_infinite_burstiness_is_a_fixed_interval() -> None:
    assert arrival_times(4, rate=2.0, burstiness=math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_seeded() -> None:
    assert arrival_times(50, 3.0, seed=7) == arrival_times(50, 3.0, seed=7)
    assert arrival_times(50, 3.0, seed=7) != arrival_times(50, 3.0, seed=8)


@pytest.mark.parametrize(("rate", "burstiness"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_rejects_nonpositive_parameters(rate: float, burstiness: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        arrival_times(3, rate, burstiness)


def test_replay_shifts_to_zero_and_speeds_up() -> None:
    stamps = [100.0, 101.0, 103.0]
    assert replay_times(stamps) == [0.0, 1.0, 3.0]
    assert replay_times(stamps, speedup=2.0) == [0.0, 0.5, 1.5]
    assert replay_times([]) == []
    with pytest.raises(ValueError, match="speedup"):
        replay_times(stamps, speedup=0.0)
