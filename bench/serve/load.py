"""Async load generator: streams completions or chat completions at planned times and records
them.

Each request is sent at its planned arrival (seconds from the start), waits for a
--max-concurrency slot if one is set, streams the answer over SSE, and fills a RequestRecord:
send time, TTFT, the gaps between token-carrying chunks (ITL), end-to-end latency and the
generated token count (and, when the server reports them, the prompt's cached tokens) from the
usage chunk. /v1/completions gets `prompt` (token ids or text) and reads `choices[0].text`;
/v1/chat/completions gets `messages` (one user turn holding the text) and reads
`choices[0].delta.content`, as `vllm bench serve` does. A later turn of a conversation
(`follows`) is sent when the answer before it is back, with that history (`conversation`). Errors (HTTP status,
error events, broken streams, timeouts) fail that request and the run goes on. A run bounded
by `max_duration_s` cancels what is still in flight at the deadline and never sends the rest:
both count as failed. The run's duration starts when its first request is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from pdserve.bench.serve.conversation import (
    EARLIER_TURN_FAILED,
    Conversations,
    Turns,
    chat_messages,
    completion_prompt,
)
from pdserve.bench.serve.metrics import RequestRecord

logger = logging.getLogger(__name__)

NOT_SENT = "not sent: the benchmark's time limit (--max-duration) came first"
CANCELLED = "cancelled in flight: the benchmark's time limit (--max-duration) was reached"


@dataclass(frozen=True)
class PlannedRequest:
    """One request of the run: when to send it and what to ask."""

    index: int
    arrival_s: float  # seconds after the start of the run
    prompt: list[int] | str  # token ids [input_len], or text
    output_len: int  # max_tokens, with EOS ignored
    text_tokens: int = 0  # a text prompt's tokens as the server will count them (planned)
    system: str = ""  # a shared prefix sent before the prompt (a system prompt)
    follows: int | None = None  # a later turn: sent after request `follows`, with its history

    @property
    def input_len(self) -> int:
        return len(self.prompt) if isinstance(self.prompt, list) else self.text_tokens


@dataclass(frozen=True)
class LoadSettings:
    """Where and how to send: the URL, the model name, sampling fields and client limits."""

    url: str  # e.g. http://127.0.0.1:8000/v1/completions
    model: str
    chat: bool = False  # the URL is a /v1/chat/completions endpoint
    sampling: Mapping[str, float | int] = field(default_factory=dict)  # sent as given
    api_key: str | None = None
    max_concurrency: int | None = None  # None: no client-side limit
    request_timeout_s: float = 600.0  # per request, also the longest silence between chunks
    max_duration_s: float | None = None  # None: until every request has finished
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ValueError(f"--max-duration must be > 0 s, got {self.max_duration_s}")


def request_payload(
    settings: LoadSettings, req: PlannedRequest, history: Turns | None = None
) -> dict[str, Any]:
    """The request body: the prompt, the exact output length (EOS ignored), the sampling
    fields, streamed with usage. Chat: one user message (after the system prompt and earlier
    turns, if any) and max_completion_tokens."""
    body: dict[str, Any] = {"model": settings.model}
    if settings.chat:
        body["messages"] = chat_messages(req, history or [])
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = completion_prompt(req, history or [])
        body["max_tokens"] = req.output_len
    return {
        **body,
        "ignore_eos": True,
        **settings.sampling,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def run_load(
    requests: Sequence[PlannedRequest], settings: LoadSettings
) -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival time; (records in request order, duration in s)."""
    records = [
        RequestRecord(r.index, r.input_len, r.output_len, r.arrival_s, error=NOT_SENT)
        for r in requests
    ]
    slots = (
        asyncio.Semaphore(settings.max_concurrency)
        if settings.max_concurrency
        else contextlib.nullcontext()
    )
    # the pool must not queue requests behind our back: as many connections as may be in flight
    limits = httpx.Limits(max_connections=settings.max_concurrency, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    async with httpx.AsyncClient(
        limits=limits, timeout=httpx.Timeout(settings.request_timeout_s), headers=headers
    ) as client:
        with tqdm(total=len(requests), disable=not settings.show_progress, unit="req") as bar:
            t0 = time.perf_counter()
            turns = Conversations(requests)

            async def one(req: PlannedRequest, record: RequestRecord) -> None:
                await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - t0)))
                answer = None
                try:
                    if not await turns.wait(req):
                        record.error = EARLIER_TURN_FAILED
                        return
                    if req.follows is not None:  # it arrives when the answer before it did
                        record.arrival_s = time.perf_counter() - t0
                    async with slots:
                        history = turns.history(req)
                        answer = await send_request(client, settings, req, record, t0, history)
                finally:
                    turns.finished(req, answer if record.success else None)
                    bar.update(1)

            tasks = [asyncio.create_task(one(r, rec)) for r, rec in zip(requests, records)]
            await _wait_bounded(tasks, settings.max_duration_s)
            duration = time.perf_counter() - t0 - first_send_s(records)
    return records, duration


def first_send_s(records: Sequence[RequestRecord]) -> float:
    """When the first request was sent (s from the start; 0 if none was): the run's duration
    counts from there, as vLLM's from the start of sending, not from the first arrival gap."""
    unsent = (NOT_SENT, EARLIER_TURN_FAILED)
    return min((r.start_s for r in records if r.error not in unsent), default=0.0)


async def _wait_bounded(tasks: Sequence[asyncio.Task[None]], limit_s: float | None) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=limit_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]  # a bug in this module, not the server


async def send_request(
    client: httpx.AsyncClient,
    settings: LoadSettings,
    req: PlannedRequest,
    record: RequestRecord,
    t0: float,
    history: Turns | None = None,
) -> str:
    """Stream one completion into `record` (times relative to t0); failures go to record.error.
    Returns the answer's text ("" when it failed)."""
    start = time.perf_counter()
    record.start_s, record.error = start - t0, ""
    try:
        payload = request_payload(settings, req, history)
        async with client.stream("POST", settings.url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                record.error = f"HTTP {resp.status_code}: {body[:500]}"
                return ""
            return await _read_stream(resp, record, start)
    except asyncio.CancelledError:
        record.error = CANCELLED
        raise
    except (httpx.HTTPError, ValueError) as exc:  # transport errors, bad JSON
        record.error = f"{type(exc).__name__}: {exc}"
    return ""


async def _read_stream(resp: httpx.Response, record: RequestRecord, start: float) -> str:
    last: float | None = None
    streamed = 0
    usage: dict[str, Any] | None = None
    text: list[str] = []
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, SSE comments
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            record.error = f"error event: {json.dumps(chunk['error'])[:500]}"
            return ""
        text.append(chunk_text(chunk))
        now = time.perf_counter()
        tokens = chunk_tokens(chunk)
        if tokens:
            if last is None:
                record.ttft_s = now - start
            else:
                record.itl_s.append(now - last)
            last, streamed = now, streamed + tokens
        usage = chunk.get("usage") or usage
    else:
        record.error = "the stream ended before `data: [DONE]`"
        return ""
    _finish(record, start, streamed, usage)
    return "".join(text)


def _finish(
    record: RequestRecord, start: float, streamed: int, usage: dict[str, Any] | None
) -> None:
    record.e2el_s = time.perf_counter() - start
    if streamed == 0:
        record.error = "the stream carried no tokens"
        return
    if usage is not None:
        record.output_tokens = int(usage.get("completion_tokens", streamed))
        record.input_len = int(usage.get("prompt_tokens", record.input_len))
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        record.cached_tokens = None if cached is None else int(cached)
    else:
        record.output_tokens = streamed  # one per chunk: a lower bound without usage
    record.success = True


def chunk_text(chunk: dict[str, Any]) -> str:
    """The text one streamed chunk carried (completions: `text`, chat: `delta.content`)."""
    choice = (chunk.get("choices") or [{}])[0]
    delta = choice.get("delta")
    piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return piece if isinstance(piece, str) else ""


def chunk_tokens(chunk: dict[str, Any]) -> int:
    """Tokens one streamed chunk carried (0 for usage-only, finish-only or role-only chunks).

    Exact when the server sends `token_ids`; otherwise one per chunk with text (completions:
    `text`, chat: `delta.content`), or with none yet unfinished (a token whose bytes the
    detokenizer holds back still counts). A chat stream's opening chunk, which carries only
    the role and may come before any token, does not count.
    """
    choices = chunk.get("choices") or []
    if not choices:
        return 0
    choice = choices[0]
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    delta = choice.get("delta")
    if isinstance(delta, dict):
        if delta.get("content") or delta.get("reasoning_content"):
            return 1
        return 1 if delta.get("role") is None and choice.get("finish_reason") is None else 0
    return 1 if choice.get("text") or choice.get("finish_reason") is None else 0
