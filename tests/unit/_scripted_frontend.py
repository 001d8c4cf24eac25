"""A Frontend stand-in for the HTTP server tests: the same surface, scripted deltas, no cluster."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from pdserve.engine.request import RequestMetrics
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.sampling_types import TokenLogprobs
from pdserve.engine.tokenizer import encode_prompt
from pdserve.router.frontend import FinishHook, OutputDelta, QueueFullError, RequestFailedError

FIRST_TOKEN = 100  # piece i is "generated" as token FIRST_TOKEN + i


@dataclass
class Call:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str | None


@dataclass
class ScriptedFrontend:
    """Answers every request with ``pieces``, one delta (one token) each; knobs inject failures."""

    tokenizer: PreTrainedTokenizerBase
    max_model_len: int = 64
    pieces: list[str] = field(default_factory=lambda: ["Hello", " world", "!"])
    finish_reason: str = "stop"
    queue_full: bool = False
    fail_at: int | None = None  # raise RequestFailedError instead of piece fail_at
    hang_at: int | None = None  # wait forever instead of yielding piece hang_at
    calls: list[Call] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # request ids closed before their finish
    hanging: asyncio.Event | None = None  # set once a stream reaches hang_at
    on_finish: FinishHook | None = None  # as Frontend: called once per finished request
    cached_tokens: int = 0  # the prompt tokens each request's prefill found cached

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[OutputDelta]:
        ids = encode_prompt(self.tokenizer, prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens: shorten the prompt")
        if self.queue_full:
            raise QueueFullError(8, retry_after=2.5)
        self.calls.append(Call(ids, params, request_id))
        return self._deltas(params, request_id or "req", len(ids))

    async def _deltas(
        self, params: SamplingParams, rid: str, num_prompt: int
    ) -> AsyncIterator[OutputDelta]:
        finished = False
        try:
            for i, piece in enumerate(self.pieces):
                if i == self.fail_at:
                    raise RequestFailedError(f"request {rid} failed: decode replica died")
                if i == self.hang_at:
                    if self.hanging is not None:
                        self.hanging.set()
                    await asyncio.Event().wait()
                last = i == len(self.pieces) - 1
                metrics = _metrics(len(self.pieces), self.cached_tokens) if last else None
                if metrics is not None and self.on_finish is not None:
                    self.on_finish(metrics, self.finish_reason, num_prompt)
                yield OutputDelta(
                    rid,
                    piece,
                    [FIRST_TOKEN + i],
                    _logprobs(FIRST_TOKEN + i, params.logprobs),
                    finish_reason=self.finish_reason if last else None,
                    metrics=metrics,
                )
            finished = True
        finally:
            if not finished:
                self.aborted.append(rid)


def _logprobs(token: int, top: int | None) -> list[TokenLogprobs | None]:
    if top is None:
        return []
    return [TokenLogprobs(token, -0.5, [(token, -0.5), (7, -1.5)][:top])]


def _metrics(num_output: int, cached_tokens: int = 0) -> RequestMetrics:
    return RequestMetrics(
        arrival_time=0.0,
        queue_s=0.002,
        prefill_s=0.01,
        ttft=0.02,
        e2e=0.1,
        kv_bytes=4096,
        transfer_s=0.003,
        num_output_tokens=num_output,
        cached_tokens=cached_tokens,
    )


def sse_events(text: str) -> list[Any]:
    """The payloads of an SSE body: decoded JSON objects, and the final "[DONE]" as a string."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
