"""The front of the router: validation, tokenization, detokenization, stop strings, metrics.

Workers deal in token ids only; text lives here, as in vLLM's output processor. A stop string is
found here and ends the request, which closes the router stream and aborts decode.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.request import RequestMetrics, RequestOutput
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.sampling_types import TokenLogprobs
from pdserve.engine.stop import StopStringMatcher
from pdserve.engine.tokenizer import encode_prompt
from pdserve.router.router import RequestTrace, Router


class RequestFailedError(RuntimeError):
    """A request failed inside the cluster (the cluster itself keeps serving)."""


class QueueFullError(RuntimeError):
    """Admission refused: too many requests in flight. Retry after ``retry_after`` seconds."""

    def __init__(self, limit: int, retry_after: float = 1.0) -> None:
        super().__init__(f"the server has {limit} requests in flight, its limit: retry later")
        self.retry_after = retry_after


@dataclass
class OutputDelta:
    """What a streaming caller sees per step: new tokens and the text they completed."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None  # set on the last delta


@dataclass
class Collected:
    """A request's deltas joined: what a non-streaming reply returns."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    finish_reason: str | None
    metrics: RequestMetrics | None


async def collect(deltas: AsyncIterator[OutputDelta]) -> Collected:
    """Read a stream to its end; RequestFailedError when it ends without a finish."""
    texts: list[str] = []
    token_ids: list[int] = []
    logprobs: list[TokenLogprobs | None] = []
    last: OutputDelta | None = None
    async for delta in deltas:
        texts.append(delta.text)
        token_ids += delta.token_ids
        logprobs += delta.logprobs
        last = delta
    if last is None or last.finish_reason is None:
        raise RequestFailedError("the request's stream ended without a finish")
    return Collected(
        last.request_id, "".join(texts), token_ids, logprobs, last.finish_reason, last.metrics
    )


# (metrics, finish_reason, prompt tokens) of a finished request
FinishHook = Callable[[RequestMetrics, str | None, int], None]


class Frontend:
    """Turns prompts into token streams through a Router and back into text."""

    def __init__(
        self,
        router: Router,
        tokenizer: PreTrainedTokenizerBase,
        max_model_len: int,
        max_inflight: int = 1 << 30,
        on_finish: FinishHook | None = None,
    ) -> None:
        self.router = router
        # called once per finished request, whichever API sent it (the server's /metrics)
        self.on_finish = on_finish
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_inflight = max_inflight  # bounded admission: beyond it, QueueFullError (429)
        self.inflight = 0

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """Prompt ids, or InvalidRequestError naming what to fix. Text is refused only when it
        tokenizes to no tokens ("" is BOS alone where the tokenizer adds one), as vLLM does."""
        ids = encode_prompt(self.tokenizer, prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the model's context is "
                f"{self.max_model_len} tokens (prompt + output): shorten the prompt"
            )
        return ids

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[OutputDelta]:
        """Validate and admit one request now (raising InvalidRequestError or QueueFullError),
        and return its stream; the last delta has finish_reason and metrics."""
        ids = self.tokenize(prompt)
        if self.inflight >= self.max_inflight:
            raise QueueFullError(self.max_inflight)
        return self._stream(ids, params, request_id or uuid.uuid4().hex)

    async def _stream(
        self, ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[OutputDelta]:
        metrics = RequestMetrics(arrival_time=time.perf_counter())
        trace = RequestTrace()
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        gen = self.router.generate(request_id, ids, params, trace)
        self.inflight += 1
        try:
            async for delta in gen:
                if delta.error:
                    raise RequestFailedError(f"request {request_id} failed: {delta.error}")
                now = time.perf_counter()
                if delta.token_ids and metrics.num_output_tokens == 0:
                    metrics.ttft = now - metrics.arrival_time
                metrics.num_output_tokens += len(delta.token_ids)
                text, stopped = stops.feed(detok.add(delta.token_ids))
                finish = "stop" if stopped else delta.finish_reason
                if finish is not None and not stopped:
                    text += stops.feed(detok.flush())[0] + stops.flush()
                out = OutputDelta(request_id, text, delta.token_ids, delta.logprobs, finish)
                if finish is not None:
                    metrics.e2e = now - metrics.arrival_time
                    metrics.queue_s, metrics.prefill_s = trace.prefill_queue_s, trace.prefill_s
                    metrics.kv_bytes, metrics.transfer_s = trace.kv_bytes, trace.transfer_s
                    metrics.kv_reused_bytes = trace.kv_reused_bytes
                    metrics.cached_tokens = trace.prefill_cached_tokens
                    metrics.decode_cached_tokens = trace.decode_cached_tokens
                    metrics.kv_wait_s = trace.kv_wait_s
                    out.metrics = metrics
                    if self.on_finish is not None:
                        self.on_finish(metrics, finish, len(ids))
                    yield out
                    return
                yield out
        finally:
            self.inflight -= 1
            await gen.aclose()  # a stop string or a caller going away aborts the request

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestOutput:
        """Run one request to completion."""
        ids = self.tokenize(prompt)
        out = await collect(self.stream(ids, params, request_id))
        assert out.metrics is not None
        return RequestOutput(
            request_id=out.request_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=ids,
            token_ids=out.token_ids,
            text=out.text,
            finish_reason=out.finish_reason,
            metrics=out.metrics,
            logprobs=out.logprobs if params.logprobs is not None else None,
        )
