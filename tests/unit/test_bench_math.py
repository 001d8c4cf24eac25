"""Benchmark summary math against hand-computed cases (vLLM's definitions and keys)."""

from __future__ import annotations

import math

import pytest

from pdserve.bench.serve.metrics import (
    GoodputSpecError,
    RequestRecord,
    format_result,
    parse_goodput,
    summarize,
)


def rec(
    index: int, ttft: float, e2el: float, out: int, *, ok: bool = True, input_len: int = 100
) -> RequestRecord:
    """A finished request whose tokens arrived evenly after the first."""
    gaps = [(e2el - ttft) / (out - 1)] * (out - 1) if ok and out > 1 else []
    return RequestRecord(
        index,
        input_len,
        out,
        arrival_s=0.0,
        success=ok,
        ttft_s=ttft if ok else 0.0,
        e2el_s=e2el if ok else 0.0,
        itl_s=gaps,
        output_tokens=out if ok else 0,
        error="" if ok else "HTTP 500: boom",
    )


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        rec(0, ttft=0.1, e2el=1.0, out=10),  # TPOT 0.9 / 9 = 100 ms, 9 ITLs of 100 ms
        rec(1, ttft=0.2, e2el=0.2, out=1),  # 1 token: TPOT 0 for SLOs, left out of TPOT stats
        rec(2, ttft=0.5, e2el=2.5, out=5),  # TPOT 2.0 / 4 = 500 ms, 4 ITLs of 500 ms
        rec(3, ttft=0.0, e2el=0.0, out=7, ok=False, input_len=999),
    ]


def test_counts_and_throughputs_leave_failed_requests_out(records: list[RequestRecord]) -> None:
    s = summarize(records, duration_s=10.0)
    assert (s.completed, s.failed) == (3, 1)
    assert s.total_input == 300  # the failed request's 999 prompt tokens are not counted
    assert s.total_output == 16
    assert s.request_throughput == pytest.approx(0.3)
    assert s.output_throughput == pytest.approx(1.6)
    assert s.total_token_throughput == pytest.approx(31.6)


def test_latency_stats_match_hand_computation(records: list[RequestRecord]) -> None:
    s = summarize(records, duration_s=10.0)
    ttft = s.latency["ttft"]
    assert ttft.mean_ms == pytest.approx(800 / 3)
    assert ttft.median_ms == pytest.approx(200)
    # p99 of [100, 200, 500] by linear interpolation: rank 0.99 * 2 = 1.98 -> 200 + 0.98 * 300
    assert ttft.percentiles_ms == ((99.0, pytest.approx(494.0)),)
    tpot = s.latency["tpot"]
    assert tpot.mean_ms == pytest.approx(300)  # (100 + 500) / 2: the 1-token request is left out
    assert tpot.median_ms == pytest.approx(300)
    itl = s.latency["itl"]
    assert itl.mean_ms == pytest.approx((9 * 100 + 4 * 500) / 13)
    assert itl.median_ms == pytest.approx(100)
    assert s.latency["e2el"].mean_ms == pytest.approx(3700 / 3)


def test_goodput_needs_every_slo_and_counts_one_token_outputs_as_tpot_zero(
    records: list[RequestRecord],
) -> None:
    s = summarize(records, duration_s=10.0, slos_ms={"ttft": 150, "tpot": 100})
    # TTFT <= 150: request 0 only. TPOT <= 100 (inclusive): requests 0 and 1 (1 token -> TPOT 0).
    assert s.slo_attainment_by_metric == {"ttft": pytest.approx(0.25), "tpot": pytest.approx(0.5)}
    assert s.slo_attainment == pytest.approx(0.25)  # 1 good of 4 sent: the failed one misses
    assert s.request_goodput == pytest.approx(0.1)  # 1 good request / 10 s


def test_e2el_slo(records: list[RequestRecord]) -> None:
    s = summarize(records, duration_s=4.0, slos_ms={"e2el": 1000})
    assert s.slo_attainment == pytest.approx(0.5)  # requests 0 (1.0 s) and 1 (0.2 s)
    assert s.request_goodput == pytest.approx(0.5)


def test_without_slos_there_is_no_goodput(records: list[RequestRecord]) -> None:
    s = summarize(records, duration_s=10.0)
    assert s.request_goodput is None
    assert s.slo_attainment is None
    out = s.to_json()
    assert out["request_goodput"] is None and out["slo_attainment"] is None
    block = format_result(s, request_rate=math.inf, max_concurrency=None)
    assert "goodput" not in block and "attainment" not in block


def test_all_failed_reports_zeros_not_errors() -> None:
    s = summarize([rec(0, 0, 0, 5, ok=False)], duration_s=1.0, slos_ms={"ttft": 100})
    assert (s.completed, s.failed, s.total_output) == (0, 1, 0)
    assert s.latency["ttft"].mean_ms == 0.0
    assert s.slo_attainment == 0.0


def test_json_uses_vllm_keys_and_percentile_spelling(records: list[RequestRecord]) -> None:
    s = summarize(records, 10.0, {"ttft": 150, "tpot": 100}, percentiles=(50, 90, 99.9))
    out = s.to_json()
    for key in (
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "mean_ttft_ms",
        "median_tpot_ms",
        "std_itl_ms",
        "p50_ttft_ms",
        "p90_e2el_ms",
        "p99.9_itl_ms",
        "slo_attainment",
        "slo_attainment_ttft",
        "slo_attainment_tpot",
    ):
        assert key in out, key
    assert out["p50_ttft_ms"] == pytest.approx(200)
    assert "p99_ttft_ms" not in out
    assert set(s.to_json(metrics=("ttft",))) >= {"mean_ttft_ms"}
    assert "mean_tpot_ms" not in s.to_json(metrics=("ttft",))


def test_result_block_lines_follow_vllm(records: list[RequestRecord]) -> None:
    s = summarize(records, 10.0, {"ttft": 150, "tpot": 100})
    lines = format_result(s, request_rate=2.0, max_concurrency=8).splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[1] == f"{'Successful requests:':<40} {3:<10}"
    assert f"{'Request rate configured (RPS):':<40} {2.0:<10.2f}" in lines
    assert f"{'Maximum request concurrency:':<40} {8:<10}" in lines
    assert f"{'Request goodput (req/s):':<40} {0.1:<10.2f}" in lines
    assert f"{'SLO attainment (%):':<40} {25.0:<10.2f}" in lines
    assert f"{'P99 TTFT (ms):':<40} {494.0:<10.2f}" in lines
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert lines[-1] == "=" * 50
    unbounded = format_result(s, request_rate=math.inf, max_concurrency=None)
    assert "Request rate configured" not in unbounded
    assert "Maximum request concurrency" not in unbounded


def test_record_json_flags_each_slo() -> None:
    line = rec(0, ttft=0.1, e2el=1.0, out=10).to_json({"ttft": 50, "tpot": 200})
    assert line["slo_met"] == {"ttft": False, "tpot": True}
    assert line["tpot_ms"] == pytest.approx(100)
    assert len(line["itl_ms"]) == 9


def test_parse_goodput() -> None:
    assert parse_goodput(["ttft:500", "TPOT:50.5", "e2el:2000"]) == {
        "ttft": 500.0,
        "tpot": 50.5,
        "e2el": 2000.0,
    }
    assert parse_goodput([]) == {}


@pytest.mark.parametrize(
    ("pair", "says"),
    [("ttft=500", "NAME:MILLISECONDS"), ("itl:5", "ttft, tpot, e2el"), ("ttft:fast", "number"),
     ("tpot:-1", ">= 0")],
)  # fmt: skip
def test_parse_goodput_rejects_with_the_fix(pair: str, says: str) -> None:
    with pytest.raises(GoodputSpecError, match=says):
        parse_goodput([pair])
