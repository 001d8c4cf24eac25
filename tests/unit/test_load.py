"""The load generator against a fake OpenAI-compatible server with scripted chunk timing
(tests/unit/_fake_openai_server.py): what goes over the wire and what each record holds."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from _fake_openai_server import (
    FAIL_HTTP,
    FAIL_MIDSTREAM,
    ITL,
    MAX_MODEL_LEN,
    TTFT,
    FakeState,
    fake_fixture,
    server_fixture,
)

from pdserve.bench.serve.cli import BenchConfig, main, run_benchmark
from pdserve.bench.serve.load import (
    CANCELLED,
    NOT_SENT,
    LoadSettings,
    PlannedRequest,
    chunk_tokens,
    run_load,
)
from pdserve.bench.serve.metrics import summarize
from pdserve.bench.serve.workloads import WorkloadError

__all__ = ["fake_fixture", "server_fixture"]  # pytest finds them as `fake` and `server`


def plan(outputs: list[int], arrivals: list[float] | None = None) -> list[PlannedRequest]:
    times = arrivals or [0.0] * len(outputs)
    return [
        PlannedRequest(i, t, list(range(16, 16 + 10 + i)), out)
        for i, (out, t) in enumerate(zip(outputs, times))
    ]


def settings(url: str, **kw: Any) -> LoadSettings:
    return LoadSettings(url=url + "/v1/completions", model="fake-model", show_progress=False, **kw)


def test_records_ttft_itl_tpot(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    records, duration = asyncio.run(run_load(plan([6, 6, 6, 1]), settings(url)))
    assert all(r.success for r in records), [r.error for r in records]
    # lower bounds from the script; no upper bound on wall-clock time (a loaded machine only
    # delays), but the parts must add up: first token, then the gaps, within the request
    for r in records[:3]:
        assert r.output_tokens == 6
        assert r.ttft_s >= TTFT
        assert len(r.itl_s) == 5  # the text-less token counts, the finish-only chunk does not
        assert sorted(r.itl_s)[2] >= ITL - 0.01
        assert r.tpot_s >= ITL - 0.01
        assert r.ttft_s + sum(r.itl_s) <= r.e2el_s + 1e-6
        assert r.tpot_s == pytest.approx((r.e2el_s - r.ttft_s) / 5, rel=1e-6)
        assert r.e2el_s >= TTFT + 5 * ITL
    assert records[3].output_tokens == 1 and records[3].itl_s == []
    assert duration >= TTFT + 5 * ITL
    # what went over the wire: exact prompt ids, exact output length, streamed usage
    body = next(b for b in state.bodies if len(b["prompt"]) == 10)  # request 0
    assert body["prompt"] == list(range(16, 26))
    assert (body["max_tokens"], body["ignore_eos"]) == (6, True)
    assert not {"temperature", "top_p", "top_k", "messages"} & set(body)  # none in settings
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert sorted(len(b["prompt"]) for b in state.bodies) == [10, 11, 12, 13]
    assert records[2].input_len == 12


def test_failures_are_counted_and_the_run_goes_on(fake: tuple[str, FakeState]) -> None:
    url, _ = fake
    records, duration = asyncio.run(
        run_load(plan([3, FAIL_HTTP, FAIL_MIDSTREAM, 3]), settings(url))
    )
    assert [r.success for r in records] == [True, False, False, True]
    assert records[1].error.startswith("HTTP 500") and "scripted failure" in records[1].error
    assert "decode worker died" in records[2].error
    summary = summarize(records, duration, {"ttft": 10_000})
    assert (summary.completed, summary.failed, summary.total_output) == (2, 2, 6)
    assert summary.slo_attainment == pytest.approx(0.5)


def test_max_concurrency_is_respected(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    records, _ = asyncio.run(run_load(plan([3] * 8), settings(url, max_concurrency=2)))
    assert all(r.success for r in records)
    assert state.max_in_flight == 2
    # the third request waited for a slot: sent only after the first two finished
    first_done = min(r.start_s + r.e2el_s for r in records[:2])
    assert records[2].start_s >= first_done - 0.01


def test_requests_leave_at_their_arrival_times(fake: tuple[str, FakeState]) -> None:
    url, _ = fake
    records, _ = asyncio.run(run_load(plan([2, 2], arrivals=[0.0, 0.3]), settings(url)))
    assert records[0].start_s < 0.1
    assert records[1].start_s >= 0.3


def test_duration_starts_when_the_first_request_is_sent(fake: tuple[str, FakeState]) -> None:
    url, _ = fake
    # the first arrival is 1 s in: a rate's first gap is no part of the benchmark's duration
    records, duration = asyncio.run(run_load(plan([3, 3], arrivals=[1.0, 1.1]), settings(url)))
    first_sent = min(r.start_s for r in records)
    last_done = max(r.start_s + r.e2el_s for r in records)
    assert first_sent >= 1.0  # so a duration from the start of the run would be 1 s longer
    # from the first send, not from the start: shorter than the time to the last answer (a
    # duration from the start would be at least that; the lag after it is far under 1 s)
    assert last_done - first_sent <= duration < last_done


def test_time_limit_cancels_in_flight_and_unsent(fake: tuple[str, FakeState]) -> None:
    url, _ = fake
    reqs = plan([2, 100, 2], arrivals=[0.0, 0.0, 30.0])  # 100 tokens take ~4 s; 30 s: never
    records, duration = asyncio.run(run_load(reqs, settings(url, max_duration_s=0.6)))
    assert records[0].success
    assert records[1].error == CANCELLED
    assert records[2].error == NOT_SENT
    assert 0.6 <= duration < 3.0


def test_chunk_tokens_prefers_token_ids() -> None:
    assert chunk_tokens({"choices": [{"text": "", "token_ids": [1, 2, 3]}]}) == 3
    assert chunk_tokens({"choices": [{"text": "ab", "finish_reason": "stop"}]}) == 1
    assert chunk_tokens({"choices": [{"text": "", "finish_reason": "stop"}]}) == 0
    assert chunk_tokens({"choices": [], "usage": {"completion_tokens": 4}}) == 0


def test_run_benchmark_asks_the_server_for_model_and_context(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    config = BenchConfig(
        base_url=url + "/v1/",
        workload="fixed:in=200,out=4",  # longer than the fake's 128-token context
        num_prompts=3,
        request_rate=100.0,
        goodput_ms={"ttft": 5000, "tpot": 5000},
        show_progress=False,
    )
    result = asyncio.run(run_benchmark(config))
    assert {b["model"] for b in state.bodies} == {"fake-model"}
    # clipped: the prompt keeps all but one token of the context, the output gets the rest
    assert [(len(b["prompt"]), b["max_tokens"]) for b in state.bodies] == [(127, 1)] * 3
    assert result.summary.completed == 3
    assert result.summary.slo_attainment == 1.0
    assert result.result["model_id"] == "fake-model"
    assert result.result["max_model_len"] == MAX_MODEL_LEN
    assert result.result["request_rate"] == 100.0


def test_trace_replay_refuses_a_request_rate(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,2\n")
    config = BenchConfig(workload=f"trace:{trace}", request_rate=2.0, num_prompts=1)
    with pytest.raises(WorkloadError, match="timestamps=false"):
        asyncio.run(run_benchmark(config))


def test_cli_prints_the_block_and_saves_result_and_records(
    fake: tuple[str, FakeState], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = fake
    out = tmp_path / "res" / "run.json"
    argv = ["--url", url, "--workload", "uniform:in=8-16,out=2-4", "--num-prompts", "5",
            "--request-rate", "50", "--burstiness", "0.5", "--goodput", "ttft:5000", "tpot:5000",
            "--metric-percentiles", "50,99", "--save-result", str(out), "--disable-tqdm"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Burstiness factor: 0.5 (Gamma distribution)" in printed
    assert "============ Serving Benchmark Result ============" in printed
    assert "Request goodput (req/s):" in printed and "P50 TPOT (ms):" in printed
    saved = json.loads(out.read_text())
    assert (saved["completed"], saved["failed"], saved["slo_attainment"]) == (5, 0, 1.0)
    assert {"p50_ttft_ms", "p99_e2el_ms", "request_goodput", "burstiness"} <= set(saved)
    lines = out.with_suffix(".records.jsonl").read_text().splitlines()
    assert len(lines) == 5
    assert json.loads(lines[0])["slo_met"] == {"ttft": True, "tpot": True}


def test_cli_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        assert main(["--url", f"http://127.0.0.1:{port}", "--disable-tqdm"]) == 2
    assert "is the server up? check --url" in capsys.readouterr().err
