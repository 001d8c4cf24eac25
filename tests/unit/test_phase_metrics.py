"""Latency breakdown from two /metrics scrapes, on the text the server really exports."""

from __future__ import annotations

import pytest

from pdserve.bench.sweep.phase_metrics import PhaseTotals
from pdserve.cluster.serving.metrics import ServingMetrics
from pdserve.engine.request import RequestMetrics


def finished(
    queue: float, prefill: float, transfer: float, ttft: float, e2e: float, kv_bytes: int = 1024
) -> RequestMetrics:
    return RequestMetrics(
        arrival_time=0.0,
        queue_s=queue,
        prefill_s=prefill,
        ttft=ttft,
        e2e=e2e,
        kv_bytes=kv_bytes,
        transfer_s=transfer,
        num_output_tokens=8,
    )


def scrape(m: ServingMetrics) -> PhaseTotals:
    return PhaseTotals.parse(m.render().decode())


def test_delta_covers_only_requests_finished_between_scrapes() -> None:
    m = ServingMetrics("tiny")
    m.observe_request(finished(9.0, 9.0, 9.0, 20.0, 90.0), "length", 10)  # before: left out
    before = scrape(m)
    m.observe_request(finished(0.010, 0.100, 0.050, 0.120, 1.120), "length", 10)
    m.observe_request(finished(0.030, 0.300, 0.150, 0.360, 2.360), "length", 10)
    delta = scrape(m).minus(before)
    assert delta.finished == 2
    b = delta.breakdown_ms()
    assert b["queue"] == pytest.approx(20.0)  # (10 + 30) / 2 ms
    assert b["prefill"] == pytest.approx(200.0)
    assert b["transfer"] == pytest.approx(100.0)
    assert b["ttft"] == pytest.approx(240.0)
    assert b["e2e"] == pytest.approx(1740.0)
    assert b["decode"] == pytest.approx(1500.0)  # e2e - ttft: (1000 + 2000) / 2
    assert b["ttft_other"] == pytest.approx(20.0)  # 240 - 20 - 200


def test_colocated_requests_have_no_transfer_and_all_ttft_is_other() -> None:
    m = ServingMetrics("tiny")
    before = scrape(m)
    # colocated: no KV moved, queue and prefill not timed apart
    m.observe_request(finished(0.0, 0.0, 0.0, 0.200, 0.700, kv_bytes=0), "length", 10)
    b = scrape(m).minus(before).breakdown_ms()
    assert b["transfer"] == 0.0 and b["queue"] == 0.0 and b["prefill"] == 0.0
    assert b["ttft_other"] == pytest.approx(200.0)
    assert b["decode"] == pytest.approx(500.0)


def test_nothing_finished_gives_zeros_and_missing_metrics_count_as_zero() -> None:
    m = ServingMetrics("tiny")
    assert scrape(m).minus(scrape(m)).breakdown_ms() == dict.fromkeys(
        ("queue", "prefill", "transfer", "decode", "ttft", "e2e", "ttft_other"), 0.0
    )
    other = PhaseTotals.parse("# TYPE unrelated counter\nunrelated_total 3.0\n")
    assert other.finished == 0 and set(other.sums.values()) == {0.0}
