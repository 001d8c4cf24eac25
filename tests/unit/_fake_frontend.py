"""A scripted Frontend for the HTTP server tests: no model, no Ray.

Every request answers "Hello", " world", "!" (token ids FIRST_TOKEN, +1, +2), finish "stop",
with fixed metrics. Knobs: ``queue_full`` (QueueFullError, Retry-After 3), ``fail_at`` (the
stream fails at that token), ``hang_at`` (the stream sets ``hanging`` and waits there forever).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from pdserve.engine.request import RequestMetrics
from pdserve.engine.sampling import TokenLogprobs
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.tokenizer import encode_prompt
from pdserve.router.frontend import OutputDelta, QueueFullError, RequestFailedError

FIRST_TOKEN = 300
TEXTS = ("Hello", " world", "!")


@dataclass
class Call:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


def sse_events(body: str) -> list[Any]:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    events: list[Any] = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


class FakeFrontend:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_model_len: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.calls: list[Call] = []
        self.aborted: list[str] = []
        self.queue_full = False
        self.fail_at: int | None = None
        self.hang_at: int | None = None
        self.hanging: asyncio.Event | None = None

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[OutputDelta]:
        ids = encode_prompt(self.tokenizer, prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the model's context is "
                f"{self.max_model_len} tokens: shorten the prompt"
            )
        if self.queue_full:
            raise QueueFullError(1, retry_after=3)
        call = Call(request_id or uuid.uuid4().hex, ids, params)
        self.calls.append(call)
        return self._stream(call)

    async def _stream(self, call: Call) -> AsyncIterator[OutputDelta]:
        metrics = RequestMetrics(arrival_time=time.perf_counter(), queue_s=0.001, prefill_s=0.01)
        metrics.ttft, metrics.kv_bytes, metrics.transfer_s = 0.02, 4096, 0.002
        finished = failed = False
        try:
            for i, text in enumerate(TEXTS):
                if i == self.fail_at:
                    failed = True
                    raise RequestFailedError(
                        f"request {call.request_id} failed: decode replica died"
                    )
                if i == self.hang_at:
                    assert self.hanging is not None
                    self.hanging.set()
                    await asyncio.Event().wait()
                metrics.num_output_tokens += 1
                last = i == len(TEXTS) - 1
                delta = OutputDelta(
                    call.request_id, text, [FIRST_TOKEN + i], self._logprobs(i, call.params)
                )
                if last:
                    metrics.e2e = 0.05
                    delta.finish_reason, delta.metrics = "stop", metrics
                    finished = True
                yield delta
        finally:
            if not finished and not failed:
                self.aborted.append(call.request_id)

    @staticmethod
    def _logprobs(i: int, params: SamplingParams) -> list[TokenLogprobs | None]:
        if params.logprobs is None:
            return []
        tid = FIRST_TOKEN + i
        top = [(tid, -0.5)] + [(tid + 10 + k, -1.0 - k) for k in range(params.logprobs - 1)]
        return [TokenLogprobs(tid, -0.5, top)]
