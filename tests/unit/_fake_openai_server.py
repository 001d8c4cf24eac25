"""A fake OpenAI-compatible server with scripted chunk timing, for the benchmark client's tests.
Test modules import ``server_fixture`` and ``fake_fixture``, which pytest knows as ``server``
(one per module) and ``fake`` (the same server, its recorded state reset).

It streams `max_tokens` (chat: `max_completion_tokens`) tokens: the first after TTFT, the rest
ITL apart; token 1 carries no text (a detokenizer holding bytes back) and a text-less finish
chunk follows the last token, so the client must count token-carrying chunks, not text. A chat
stream opens with a role-only chunk at once, before any token, as pdserve's server does. Two
output lengths are scripted to fail: FAIL_HTTP answers 500, FAIL_MIDSTREAM sends an error
event after two tokens.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

TTFT = 0.10
ITL = 0.04
FAIL_HTTP = 7
FAIL_MIDSTREAM = 9
MAX_MODEL_LEN = 128
CHAT_TEMPLATE_TOKENS = 5  # what the fake adds to a chat prompt's words in its usage


@dataclass
class FakeState:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    seen: list[list[str]] = field(default_factory=list)  # earlier prompts' words (a prefix cache)
    queries: int = 0
    hits: int = 0

    def reset(self) -> None:
        self.bodies.clear()
        self.seen.clear()
        self.in_flight = self.max_in_flight = self.queries = self.hits = 0

    def cached(self, words: list[str]) -> int:
        """Leading words some earlier prompt had too (the fake's prefix cache), counted."""
        hit = max((_common(words, old) for old in self.seen), default=0)
        self.seen.append(words)
        self.queries, self.hits = self.queries + len(words), self.hits + hit
        return hit


def _common(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def text_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def delta_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": text} if text else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def prompt_words(body: dict[str, Any]) -> list[str]:
    """The prompt as the fake counts it: words (token ids as they are), chat messages joined
    with CHAT_TEMPLATE_TOKENS words of template."""
    if "messages" in body:
        words = [w for m in body["messages"] for w in m["content"].split()]
        return words + ["<template>"] * CHAT_TEMPLATE_TOKENS
    prompt = body["prompt"]
    return prompt.split() if isinstance(prompt, str) else [str(t) for t in prompt]


def prompt_tokens(body: dict[str, Any]) -> int:
    return len(prompt_words(body))


async def stream_tokens(state: FakeState, body: dict[str, Any], chat: bool) -> AsyncIterator[str]:
    n = body["max_completion_tokens"] if chat else body["max_tokens"]
    make = delta_chunk if chat else text_chunk
    try:
        if chat:  # the role, before the first token
            yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(TTFT)
        for i in range(n):
            if i:
                await asyncio.sleep(ITL)
            if n == FAIL_MIDSTREAM and i == 2:
                yield sse({"error": {"message": "decode worker died", "code": 500}})
                return
            yield sse(make("" if i == 1 else f"t{i}"))
        yield sse(make("", finish="length"))  # no text, no token: must not count
        words = prompt_words(body)
        usage = {
            "prompt_tokens": len(words),
            "completion_tokens": n,
            "prompt_tokens_details": {"cached_tokens": state.cached(words)},
        }
        yield sse({"choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        state.in_flight -= 1


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": "fake-model", "object": "model", "max_model_len": MAX_MODEL_LEN}
        return {"object": "list", "data": [card]}

    def answer(body: dict[str, Any], chat: bool) -> JSONResponse | StreamingResponse:
        state.bodies.append(body)
        if body.get("max_completion_tokens" if chat else "max_tokens") == FAIL_HTTP:
            return JSONResponse({"error": {"message": "scripted failure"}}, status_code=500)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        return StreamingResponse(stream_tokens(state, body, chat), media_type="text/event-stream")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        lines = [
            "# TYPE pdserve:prefix_cache_queries counter",
            f'pdserve:prefix_cache_queries_total{{pool="decode"}} {state.queries}',
            "# TYPE pdserve:prefix_cache_hits counter",
            f'pdserve:prefix_cache_hits_total{{pool="decode"}} {state.hits}',
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: dict[str, Any] = Body(...)) -> JSONResponse | StreamingResponse:
        return answer(body, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: dict[str, Any] = Body(...)) -> JSONResponse | StreamingResponse:
        return answer(body, chat=True)

    return app


@pytest.fixture(scope="module", name="server")
def server_fixture() -> Iterator[tuple[str, FakeState]]:
    state = FakeState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:  # uvicorn offers no readiness callback
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", state
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture(name="fake")
def fake_fixture(server: tuple[str, FakeState]) -> tuple[str, FakeState]:
    server[1].reset()
    return server
