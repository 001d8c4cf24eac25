"""A sweep probe's pure parts: the deadline that cannot change attainment, the summary's entry."""

from __future__ import annotations

import pytest

from pdserve.bench.serve.load import PlannedRequest
from pdserve.bench.serve.metrics import RequestRecord, summarize
from pdserve.bench.sweep.probe import DEADLINE_SLACK_S, probe_deadline, probe_result


def planned(arrival_s: float, output_len: int) -> PlannedRequest:
    return PlannedRequest(0, arrival_s, [1, 2, 3], output_len)


def test_deadline_is_the_last_request_that_could_still_meet_its_slos() -> None:
    reqs = [planned(0.0, 101), planned(5.0, 11), planned(6.0, 1)]
    # ttft 1000 + tpot 20 x (out - 1): 3.0 s, 1.2 s, 1.0 s after arrival -> latest at 7.0 s
    assert probe_deadline(reqs, {"ttft": 1000, "tpot": 20}) == pytest.approx(7.0 + DEADLINE_SLACK_S)
    # an e2el SLO bounds it too, whichever is tighter
    assert probe_deadline(reqs, {"ttft": 1000, "tpot": 20, "e2el": 500}) == pytest.approx(
        6.5 + DEADLINE_SLACK_S
    )
    assert probe_deadline(reqs, {"e2el": 4000}) == pytest.approx(10.0 + DEADLINE_SLACK_S)


def test_a_later_turn_adds_its_bound_to_the_turn_it_follows() -> None:
    """A conversation's second turn is sent only when its first ends, up to 3.0 s in: it can
    still meet its SLOs until 3.0 + 1.2 s, after every request that arrived on its own."""
    first = PlannedRequest(0, 0.0, "hi", 101)
    second = PlannedRequest(1, 0.0, "and?", 11, follows=0)
    alone = PlannedRequest(2, 3.0, [1, 2], 1)  # 4.0 s at most
    deadline = probe_deadline([first, second, alone], {"ttft": 1000, "tpot": 20})
    assert deadline == pytest.approx(4.2 + DEADLINE_SLACK_S)


def test_no_deadline_when_the_slos_bound_no_request() -> None:
    assert probe_deadline([planned(0.0, 10)], {"ttft": 1000}) is None
    assert probe_deadline([planned(0.0, 10)], {"tpot": 50}) is None


def record(i: int, ttft: float, e2el: float, out: int, ok: bool = True) -> RequestRecord:
    return RequestRecord(
        i, 16, out, 0.0, success=ok, ttft_s=ttft, e2el_s=e2el, output_tokens=out if ok else 0
    )


def test_probe_result_from_hand_computed_records() -> None:
    records = [
        record(0, 0.1, 0.1 + 9 * 0.02, 10),  # meets both
        record(1, 0.8, 0.8 + 9 * 0.02, 10),  # TTFT miss
        record(2, 0.1, 0.1 + 9 * 0.08, 10),  # TPOT miss
        record(3, 0.0, 0.0, 10, ok=False),  # failed: meets none
    ]
    summary = summarize(records, duration_s=2.0, slos_ms={"ttft": 500, "tpot": 50})
    p = probe_result(summary, rate=3.0, devices=2, breakdown_ms={"queue": 1.0})
    assert (p.rate, p.rate_per_device) == (3.0, 1.5)
    assert p.attainment == pytest.approx(0.25)
    assert p.ttft_attainment == pytest.approx(0.5) and p.tpot_attainment == pytest.approx(0.5)
    assert (p.num_requests, p.failed, p.duration_s) == (4, 1, 2.0)
    assert p.extra["goodput"] == pytest.approx(0.5)  # 1 good request in 2 s
    assert p.extra["mean_ttft_ms"] == pytest.approx(1000 / 3)
    assert p.breakdown_ms == {"queue": 1.0}
    assert "e2el_attainment" not in p.extra


def test_probe_result_without_a_tpot_slo() -> None:
    summary = summarize(
        [record(0, 0.1, 0.5, 4)], duration_s=1.0, slos_ms={"ttft": 500, "e2el": 400}
    )
    p = probe_result(summary, rate=1.0, devices=1, breakdown_ms={})
    assert p.tpot_attainment is None and p.ttft_attainment == 1.0
    assert p.extra["e2el_attainment"] == 0.0 and p.attainment == 0.0
