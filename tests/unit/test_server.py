"""The OpenAI-compatible HTTP server over a scripted frontend: formats, errors, auth, limits."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from _scripted_frontend import FIRST_TOKEN, ScriptedFrontend, sse_events
from _server_helpers import (  # noqa: F401
    CHAT,
    COMPLETION,
    HISTOGRAMS,
    MODEL,
    client_fixture,
    frontend_fixture,
    serve,
    tokenizer_fixture,
)
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message

from pdserve.cluster.serving.server import create_app
from pdserve.engine.deploy_config import ServerSettings
from pdserve.engine.tokenizer import apply_chat_template


def test_completion_reply_and_sampling_fields(
    client: TestClient, frontend: ScriptedFrontend
) -> None:
    body = {**COMPLETION, "temperature": 0, "top_k": 5, "seed": 3, "stop": "!", "user": "u-1"}
    r = client.post("/v1/completions", json={**body, "stop_token_ids": [1], "min_p": 0.1})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["id"].startswith("cmpl-") and reply["object"] == "text_completion"
    assert reply["model"] == MODEL and isinstance(reply["created"], int)
    choice = reply["choices"][0]
    assert choice == {"index": 0, "text": "Hello world!", "logprobs": None, "finish_reason": "stop"}
    call = frontend.calls[0]
    assert call.request_id == reply["id"]
    n = len(call.prompt_ids)
    assert reply["usage"] == {
        "prompt_tokens": n, "completion_tokens": 3, "total_tokens": n + 3,
        "prompt_tokens_details": {"cached_tokens": 0},
    }  # fmt: skip
    p = call.params
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.min_p) == (16, 0.0, 5, 3, 0.1)
    assert p.stop == ("!",) and p.stop_token_ids == (1,)


def test_completion_accepts_token_ids_and_a_list_of_one_prompt(
    client: TestClient, frontend: ScriptedFrontend
) -> None:
    assert client.post("/v1/completions", json={**COMPLETION, "prompt": [5, 6, 7]}).is_success
    assert client.post("/v1/completions", json={**COMPLETION, "prompt": ["Hi"]}).is_success
    assert frontend.calls[0].prompt_ids == [5, 6, 7]
    assert frontend.calls[1].prompt_ids == frontend.tokenizer.encode("Hi")


def test_completion_stream_deltas_finish_usage_done(client: TestClient) -> None:
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hello", " world", "!"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert {c["id"] for c in chunks} == {usage["id"]} and usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 3


def test_usage_reports_the_prompt_tokens_found_in_a_prefix_cache(
    client: TestClient, frontend: ScriptedFrontend
) -> None:
    """OpenAI's usage.prompt_tokens_details.cached_tokens: RequestMetrics.cached_tokens, the
    prompt tokens the prefill did not compute, streamed or not."""
    frontend.cached_tokens = 2
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    streamed = sse_events(client.post("/v1/chat/completions", json=body).text)[-2]["usage"]
    whole = client.post("/v1/completions", json=COMPLETION).json()["usage"]
    assert (
        streamed["prompt_tokens_details"] == whole["prompt_tokens_details"] == {"cached_tokens": 2}
    )


def test_stream_sends_a_chunk_for_every_token_even_with_no_text_yet(
    client: TestClient, frontend: ScriptedFrontend
) -> None:
    """A token whose bytes do not complete a character yet still gets its chunk (empty text),
    as vLLM does, so clients see each token's arrival time."""
    frontend.pieces = ["Hello", "", "!"]
    events = sse_events(client.post("/v1/completions", json={**COMPLETION, "stream": True}).text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["Hello", "", "!"]


def test_stream_without_include_usage_has_no_usage_chunk(client: TestClient) -> None:
    events = sse_events(client.post("/v1/completions", json={**COMPLETION, "stream": True}).text)
    assert events[-1] == "[DONE]" and len(events) == 4
    assert all(e["usage"] is None for e in events[:-1])


def test_chat_applies_the_template_and_defaults_max_tokens_to_the_context(
    client: TestClient, frontend: ScriptedFrontend
) -> None:
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": parts}]
    r = client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "Hello world!"}
    call = frontend.calls[0]
    rendered = [messages[0], {"role": "user", "content": "Hi there"}]
    assert call.prompt_ids == apply_chat_template(frontend.tokenizer, rendered)
    assert call.params.max_tokens == frontend.max_model_len - len(call.prompt_ids)
    r = client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 9, "max_completion_tokens": 4}
    )
    assert r.is_success and frontend.calls[1].params.max_tokens == 4


def test_chat_stream_opens_with_the_role_and_ends_with_usage(client: TestClient) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(client.post("/v1/chat/completions", json=body).text)
    chunks = events[:-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:])
    assert text == "Hello world!" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"]["completion_tokens"] == 3


def test_logprobs_in_completion_and_chat_formats(
    client: TestClient, frontend: ScriptedFrontend
) -> None:
    tokens = [frontend.tokenizer.decode([FIRST_TOKEN + i]) for i in range(3)]
    lp = client.post("/v1/completions", json={**COMPLETION, "logprobs": 1}).json()
    lp = lp["choices"][0]["logprobs"]
    assert lp["tokens"] == tokens and lp["token_logprobs"] == [-0.5] * 3
    assert lp["top_logprobs"][0] == {tokens[0]: -0.5}
    assert lp["text_offset"] == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]
    chat = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2})
    content = chat.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == tokens and len(content[0]["top_logprobs"]) == 2
    assert content[0]["bytes"] == list(tokens[0].encode())
    assert frontend.calls[1].params.logprobs == 2
    assert client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}).status_code == 400


def test_models_health_and_status(frontend: ScriptedFrontend) -> None:
    async def status() -> dict[str, Any]:
        return {"state": "serving", "decode": [{"instance": 0}]}

    app = create_app(frontend, ServerSettings(served_model_name=MODEL), status=status)
    with TestClient(app) as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
        assert c.get(f"/v1/models/{MODEL}").json()["max_model_len"] == frontend.max_model_len
        assert c.get("/v1/models/other").status_code == 404
        assert c.get("/health").status_code == 200
        assert c.get("/status").json() == {"state": "serving", "decode": [{"instance": 0}]}


@pytest.mark.parametrize("mode", ["reply", "stream", "stream-to-a-stalled-client"])
def test_client_disconnect_aborts_the_request_at_once(
    frontend: ScriptedFrontend, mode: str
) -> None:
    # A stalled client's send blocks, so the stream is parked at a yield when the client leaves.
    stalled = mode == "stream-to-a-stalled-client"
    frontend.hang_at = None if stalled else 1
    app = create_app(frontend, ServerSettings(served_model_name=MODEL))
    body = {**COMPLETION, "stream": mode != "reply"}
    sent, aborted = asyncio.run(_disconnect_while_generating(app, frontend, body, stalled))
    assert aborted == [frontend.calls[0].request_id]  # aborted before the handler returned
    if mode == "stream":  # the first token reached the client before it left
        assert b"Hello" in b"".join(m.get("body", b"") for m in sent)


async def _disconnect_while_generating(
    app: FastAPI, frontend: ScriptedFrontend, body: dict[str, Any], stalled: bool
) -> tuple[list[Message], list[str]]:
    frontend.hanging = asyncio.Event()
    raw = json.dumps(body).encode()
    inbox: list[dict[str, Any]] = [{"type": "http.request", "body": raw, "more_body": False}]
    gone = asyncio.Event()
    sent: list[Message] = []

    async def receive() -> Message:
        if inbox:
            return inbox.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if stalled and message["type"] == "http.response.body":
            frontend.hanging.set()  # type: ignore[union-attr]
            await asyncio.Event().wait()

    path = "/v1/completions"
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(raw))]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST",
             "http_version": "1.1", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": headers}  # fmt: skip
    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(frontend.hanging.wait(), 5)
    gone.set()
    await asyncio.wait_for(task, 5)
    return sent, list(frontend.aborted)


def test_metrics_exposition_after_requests(client: TestClient, frontend: ScriptedFrontend) -> None:
    client.post("/v1/completions", json=COMPLETION)
    client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    label = (("model_name", MODEL),)
    for histogram in HISTOGRAMS:
        assert samples[(f"pdserve:{histogram}_seconds_count", label)] == 2
    assert samples[("pdserve:time_to_first_token_seconds_sum", label)] == pytest.approx(0.04)
    assert samples[("pdserve:generation_tokens_total", label)] == 6
    assert samples[("pdserve:kv_transfer_bytes_total", label)] == 2 * 4096
    prompt_tokens = sum(len(c.prompt_ids) for c in frontend.calls)
    assert samples[("pdserve:prompt_tokens_total", label)] == prompt_tokens
    stop = (("finished_reason", "stop"), ("model_name", MODEL))
    assert samples[("pdserve:request_success_total", stop)] == 2
