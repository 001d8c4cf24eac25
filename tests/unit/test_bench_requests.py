"""What `pdserve bench` sends and measures, as a `vllm bench serve` user expects: chat requests,
sampling flags, the endpoints it accepts and a duration that starts with the first request.
Against the fake server of tests/unit/_fake_openai_server.py."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from _fake_openai_server import (
    CHAT_TEMPLATE_TOKENS,
    ITL,
    TTFT,
    FakeState,
    fake_fixture,
    server_fixture,
)

from pdserve.bench.serve.cli import main
from pdserve.bench.serve.load import LoadSettings, PlannedRequest, run_load
from pdserve.bench.serve.runner import CHAT, BenchConfig, BenchError, run_benchmark

__all__ = ["fake_fixture", "server_fixture"]  # pytest finds them as `fake` and `server`

TEXT = "Summarize the following passage.\n\nAlice was beginning to get very tired"


def test_chat_sends_one_user_message_and_times_the_content_deltas(
    fake: tuple[str, FakeState],
) -> None:
    url, state = fake
    settings = LoadSettings(url + CHAT, "fake-model", chat=True, show_progress=False)
    reqs = [PlannedRequest(0, 0.0, TEXT, 6, text_tokens=20)]
    (record,), _ = asyncio.run(run_load(reqs, settings))
    assert record.success, record.error
    # the role-only chunk came at once: the first token came TTFT later, and it is TTFT
    assert record.ttft_s >= TTFT  # not the role chunk's time (0); a loaded machine only delays
    assert record.output_tokens == 6 and len(record.itl_s) == 5  # the text-less delta counts
    assert record.tpot_s >= ITL - 0.01
    assert record.ttft_s + sum(record.itl_s) <= record.e2el_s + 1e-6
    assert record.input_len == len(TEXT.split()) + CHAT_TEMPLATE_TOKENS  # the server's usage
    (body,) = state.bodies
    assert body["messages"] == [{"role": "user", "content": TEXT}]
    assert body["max_completion_tokens"] == 6 and "prompt" not in body
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True


def test_every_workload_sends_text_on_chat_and_chat_sends_text_everywhere(
    fake: tuple[str, FakeState],
) -> None:
    url, state = fake
    config = BenchConfig(
        base_url=url, endpoint=CHAT, workload="fixed:in=40,out=3", num_prompts=3, seed=1,
        show_progress=False,
    )  # fmt: skip
    result = asyncio.run(run_benchmark(config))
    assert result.summary.completed == 3
    contents = [b["messages"][0]["content"] for b in state.bodies]
    assert all(isinstance(c, str) and len(c.split()) > 10 for c in contents)
    # the fake model has no tokenizer here: lengths were estimated, and that is recorded
    assert (result.result["prompts"], result.result["tokenizer"]) == ("text", None)
    assert result.result["endpoint"] == CHAT

    state.reset()
    completions = BenchConfig(
        base_url=url, workload="chat:in=40,out=3", num_prompts=2, show_progress=False
    )
    asyncio.run(run_benchmark(completions))
    assert all(isinstance(b["prompt"], str) for b in state.bodies)


def test_sampling_flags_are_sent_and_recorded(fake: tuple[str, FakeState], tmp_path: Path) -> None:
    url, state = fake
    out = tmp_path / "run.json"
    base = ["--url", url, "--workload", "fixed:in=8,out=2", "--num-prompts", "2",
            "--disable-tqdm", "--save-result", str(out)]  # fmt: skip
    assert main(base) == 0
    # none given: greedy, as vLLM's bench; top_p and top_k left to the server
    assert all(b["temperature"] == 0.0 and not {"top_p", "top_k"} & set(b) for b in state.bodies)
    assert json.loads(out.read_text())["sampling_params"] == {
        "temperature": 0.0,
        "ignore_eos": True,
    }

    state.reset()
    assert main([*base, "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20"]) == 0
    sent = {(b["temperature"], b["top_p"], b["top_k"]) for b in state.bodies}
    assert sent == {(0.7, 0.9, 20)}
    saved = json.loads(out.read_text())["sampling_params"]
    assert saved == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "ignore_eos": True}


def test_only_the_two_endpoints_and_valid_sampling_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(BenchError, match=r"/v1/completions.*or /v1/chat/completions"):
        BenchConfig(endpoint="/v1/embeddings")
    with pytest.raises(SystemExit):
        main(["--endpoint", "/v1/responses"])
    assert "invalid choice" in capsys.readouterr().err
    for bad, says in (({"temperature": -1.0}, "--temperature"), ({"top_p": 0.0}, "--top-p"),
                      ({"top_k": -2}, "--top-k")):  # fmt: skip
        with pytest.raises(BenchError, match=says):
            BenchConfig(**bad)  # type: ignore[arg-type]


def test_duration_runs_from_the_first_send_past_warmups_and_the_first_gap(
    fake: tuple[str, FakeState],
) -> None:
    url, _ = fake
    config = BenchConfig(
        base_url=url, workload="fixed:in=8,out=3", num_prompts=3, num_warmups=2,
        request_rate=2.0, burstiness=math.inf, show_progress=False,
    )  # fmt: skip
    result = asyncio.run(run_benchmark(config))
    records = result.records
    first_sent = min(r.start_s for r in records)
    span = max(r.start_s + r.e2el_s for r in records) - first_sent
    assert first_sent >= 0.5  # one 0.5 s gap before the first request, which is not measured
    # from the first send: shorter than the time to the last answer counted from the start
    assert span <= result.summary.duration_s < span + first_sent
    assert result.result["duration"] == result.summary.duration_s
    assert result.summary.request_throughput == pytest.approx(3 / result.summary.duration_s)
