import pytest

from pdserve.bench.sweep.bisection import BisectionError, RateBisection, bisect_rate


def step_curve(knee: float):
    """Attainment 1.0 up to `knee` req/s, 0.5 above it."""
    return lambda rate: 1.0 if rate <= knee else 0.5


def test_finds_the_knee_within_tolerance():
    res = bisect_rate(step_curve(3.0), lo=0.5, hi=16.0, target=0.9, rel_tol=0.05, max_probes=20)
    assert res.best_rate <= 3.0
    assert res.best_rate >= 3.0 / 1.05
    assert res.bracket[1] is not None and res.bracket[1] > 3.0
    assert (res.bracket[1] - res.best_rate) <= 0.05 * res.best_rate
    # the first two probes are the ends of the range
    assert [p.rate for p in res.probes[:2]] == [16.0, 0.5]


def test_midpoints_are_geometric():
    search = RateBisection(1.0, 100.0, rel_tol=0.01)
    search.record(search.next_rate(), 0.0)  # 100 fails
    search.record(search.next_rate(), 1.0)  # 1 passes
    assert search.next_rate() == pytest.approx(10.0)


def test_top_of_range_passing_stops_at_once():
    res = bisect_rate(step_curve(100.0), lo=1.0, hi=8.0)
    assert res.best_rate == 8.0 and res.saturated and len(res.probes) == 1


def test_bottom_failing_gives_zero():
    res = bisect_rate(step_curve(0.1), lo=1.0, hi=8.0)
    assert res.best_rate == 0.0 and not res.saturated
    assert [p.meets for p in res.probes] == [False, False]


def test_probe_budget_is_respected():
    calls = []

    def evaluate(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= 3.0 else 0.0

    res = bisect_rate(evaluate, lo=0.01, hi=1000.0, rel_tol=1e-6, max_probes=5)
    assert len(calls) == len(res.probes) == 5
    assert 0 < res.best_rate <= 3.0


def test_noisy_failure_below_a_pass_never_raises_the_answer():
    search = RateBisection(1.0, 16.0, target=0.9)
    search.record(16.0, 0.2)
    search.record(1.0, 1.0)
    search.record(4.0, 0.95)  # passes
    search.record(2.0, 0.5)  # noise: fails below a pass
    res = search.result()
    assert res.best_rate == 1.0
    assert res.bracket == (1.0, 2.0)


def test_attainment_exactly_at_target_meets():
    res = bisect_rate(lambda r: 0.9, lo=1.0, hi=2.0, target=0.9)
    assert res.best_rate == 2.0


@pytest.mark.parametrize(
    ("lo", "hi", "target", "match"),
    [
        (0.0, 1.0, 0.9, "0 < lo < hi"),
        (2.0, 1.0, 0.9, "0 < lo < hi"),
        (1.0, float("inf"), 0.9, "0 < lo < hi"),
        (1.0, 2.0, 1.5, "target"),
    ],
)
def test_bad_settings_are_named(lo, hi, target, match):
    with pytest.raises(BisectionError, match=match):
        RateBisection(lo, hi, target)


def test_attainment_out_of_range_is_rejected():
    search = RateBisection(1.0, 2.0)
    with pytest.raises(BisectionError, match=r"\[0, 1\]"):
        search.record(2.0, 1.5)
