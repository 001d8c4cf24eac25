"""A Frontend stand-in for the jobs, native API and client tests: no model, no Ray, no tokenizer.

Output is the prompt upper-cased, one character per token (token id = the character's code),
``max_tokens`` at most. Words in the prompt steer it: "bad" -> InvalidRequestError up front,
"full" -> QueueFullError up front, "fail" -> RequestFailedError after one token,
"slow" -> 50 ms per token, "hold" -> waits until ``release`` is set before the first token.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from pdserve.engine.request import RequestMetrics, RequestOutput
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.router.frontend import OutputDelta, QueueFullError, RequestFailedError


def expected_text(prompt: str, max_tokens: int) -> str:
    return prompt.upper()[:max_tokens]


class FakeFrontend:
    max_model_len = 4096  # what create_app reads for /v1/models
    tokenizer = None

    def __init__(self, jitter_s: float = 0.0, seed: int = 0) -> None:
        self.jitter_s = jitter_s  # random delay per request, so completion order != submission
        self.rng = random.Random(seed)
        self.release = threading.Event()  # opens the "hold" prompts (settable from any thread)
        self.full_left = 0  # answer QueueFullError this many more times, then admit
        self.finished: list[str] = []  # request ids that ran to the end
        self.aborted: list[str] = []  # request ids whose stream was closed before the end

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[OutputDelta]:
        text = prompt if isinstance(prompt, str) else "".join(chr(65 + t % 26) for t in prompt)
        if not text or "bad" in text:
            raise InvalidRequestError(f"bad prompt {text!r}: send a good one")
        if "full" in text or self.full_left > 0:
            self.full_left = max(0, self.full_left - 1)
            raise QueueFullError(1, retry_after=0.01)
        return self._stream(text, params, request_id or uuid.uuid4().hex)

    async def _stream(
        self, prompt: str, params: SamplingParams, request_id: str
    ) -> AsyncIterator[OutputDelta]:
        metrics = RequestMetrics(arrival_time=time.perf_counter())
        out = expected_text(prompt, params.max_tokens)
        done = False
        try:
            await asyncio.sleep(self.rng.uniform(0, self.jitter_s))
            while "hold" in prompt and not self.release.is_set():
                await asyncio.sleep(0.005)
            for i, ch in enumerate(out):
                if "fail" in prompt and i == 1:
                    raise RequestFailedError(f"request {request_id} failed: worker lost")
                await asyncio.sleep(0.05 if "slow" in prompt else 0)
                metrics.num_output_tokens += 1
                last = i == len(out) - 1
                finish = ("length" if len(out) == params.max_tokens else "stop") if last else None
                delta = OutputDelta(request_id, ch, [ord(ch)], finish_reason=finish)
                if last:
                    metrics.e2e = time.perf_counter() - metrics.arrival_time
                    delta.metrics = metrics
                    done = True
                yield delta
        finally:
            (self.finished if done else self.aborted).append(request_id)

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestOutput:
        text, ids, last = "", list[int](), None
        async for delta in self.stream(prompt, params, request_id):
            text, ids, last = text + delta.text, ids + delta.token_ids, delta
        assert last is not None and last.metrics is not None
        return RequestOutput(
            request_id=last.request_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=[],
            token_ids=ids,
            text=text,
            finish_reason=last.finish_reason,
            metrics=last.metrics,
        )
