"""Conversations and shared prefixes on the wire, against the fake server of
tests/unit/_fake_openai_server.py (which caches prompt words and exports prefix-cache counters):
a later turn goes after the answer before it, carrying it; the summary reports the cached tokens
and the counters the server gives."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest
from _fake_openai_server import TTFT, FakeState, fake_fixture, server_fixture

from pdserve.bench.serve.cli import main
from pdserve.bench.serve.conversation import EARLIER_TURN_FAILED
from pdserve.bench.serve.load import LoadSettings, PlannedRequest, run_load
from pdserve.bench.serve.runner import CHAT, COMPLETIONS
from pdserve.bench.serve.server_cache import CacheCounters, format_reuse

__all__ = ["fake_fixture", "server_fixture"]  # pytest finds them as `fake` and `server`

SYSTEM = "You are a patient reader of old books."
ANSWER3 = "t0t2"  # the fake's text for 3 tokens: token 1 carries none


def conversation(outputs: list[int]) -> list[PlannedRequest]:
    return [
        PlannedRequest(i, 0.0, f"question {i}", out, 3, SYSTEM, None if i == 0 else i - 1)
        for i, out in enumerate(outputs)
    ]


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_a_turn_goes_after_the_answer_before_it_with_that_answer(
    fake: tuple[str, FakeState], endpoint: str
) -> None:
    url, state = fake
    settings = LoadSettings(url + endpoint, "m", chat=endpoint == CHAT, show_progress=False)
    records, _ = asyncio.run(run_load(conversation([3, 3, 3]), settings))
    assert all(r.success for r in records), [r.error for r in records]
    for before, after in itertools.pairwise(records):
        assert after.start_s >= before.start_s + before.e2el_s - 0.01  # closed loop
        assert after.arrival_s == pytest.approx(after.start_s, abs=0.05)
    last = state.bodies[-1]
    if endpoint == CHAT:
        roles = [m["role"] for m in last["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
        assert [m["content"] for m in last["messages"][2::2]] == [ANSWER3, ANSWER3]
    else:
        assert last["prompt"].startswith(state.bodies[1]["prompt"] + ANSWER3)
        assert last["prompt"].startswith(SYSTEM + "\n\nUser: question 0\nAssistant:" + ANSWER3)
    # the fake's cache: each later turn finds the whole previous prompt in it
    assert records[0].cached_tokens == 0
    assert all((r.cached_tokens or 0) > 0 for r in records[1:])


def test_a_failed_turn_ends_its_conversation(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    settings = LoadSettings(url + COMPLETIONS, "m", show_progress=False)
    records, duration = asyncio.run(run_load(conversation([3, 7, 3]), settings))  # 7: HTTP 500
    assert records[0].success and records[1].error.startswith("HTTP 500")
    assert records[2].error == EARLIER_TURN_FAILED and len(state.bodies) == 2
    assert duration >= TTFT


def test_the_cli_reports_cached_tokens_and_the_servers_counters(
    fake: tuple[str, FakeState], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = fake
    out = tmp_path / "run.json"
    argv = ["--url", url, "--workload", "multi-turn:turns=3,system=20,in=5,out=3",
            "--num-prompts", "6", "--request-rate", "20", "--endpoint", CHAT,
            "--save-result", str(out), "--disable-tqdm"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["completed"] == 6 and saved["total_cached_prompt_tokens"] > 0
    decode = saved["prefix_cache"]["decode"]
    assert 0 < decode["hits"] < decode["queries"] and 0 < decode["hit_rate"] < 1
    assert "Prefix cache hits/queries, decode (%):" in printed
    assert "Cached prompt tokens (usage):" in printed


def test_counters_parse_by_pool_and_subtract() -> None:
    text = """# TYPE pdserve:prefix_cache_hits counter
pdserve:prefix_cache_hits_total{model_name="m",pool="decode"} 30.0
pdserve:prefix_cache_hits_created{model_name="m",pool="decode"} 1.7e9
# TYPE pdserve:prefix_cache_queries counter
pdserve:prefix_cache_queries_total{model_name="m",pool="decode"} 100.0
pdserve:prefix_cache_queries_total{model_name="m",pool="prefill"} 100.0
# TYPE pdserve:prompt_tokens_by_source counter
pdserve:prompt_tokens_by_source_total{model_name="m",source="local_compute"} 70.0
pdserve:prompt_tokens_by_source_total{model_name="m",source="local_cache_hit"} 30.0
# TYPE pdserve:kv_transfer_bytes counter
pdserve:kv_transfer_bytes_total{model_name="m"} 7000.0
# TYPE pdserve:kv_reused_bytes counter
pdserve:kv_reused_bytes_total{model_name="m"} 3000.0
# TYPE pdserve:request_success counter
pdserve:request_success_total{model_name="m",finished_reason="length"} 4.0
"""
    before = CacheCounters.parse(text.replace("100.0", "40.0").replace("30.0", "10.0"))
    run = CacheCounters.parse(text).minus(before).to_json()
    assert run["prefix_cache"] == {
        "decode": {"queries": 60, "hits": 20, "hit_rate": pytest.approx(1 / 3)},
        "prefill": {"queries": 60, "hits": 0, "hit_rate": 0.0},
    }
    assert run["prefill_tokens"] == {"computed": 0, "cached": 20}
    assert run["kv_bytes"] == {"sent": 0, "reused": 0}
    assert "KV bytes sent / reused:" in format_reuse(CacheCounters.parse(text).to_json())
    assert CacheCounters.parse("# nothing here\n").to_json() == {} and format_reuse({}) == ""
