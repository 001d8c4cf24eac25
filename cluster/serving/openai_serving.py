"""Serving OpenAI completions and chat requests through the Frontend: replies and SSE streams.

A request is validated and admitted (``frontend.stream``) before any response exists, so a bad
request or a full queue is a 4xx, never a broken stream. However a response ends (finished,
client gone, server shutting down), the frontend's iterator is closed at once: that aborts the
request in the cluster and frees its KV blocks on both sides.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response
from transformers import PreTrainedTokenizerBase

from pdserve.cluster.serving.openai_fields import check_extra, check_message_extra
from pdserve.cluster.serving.openai_format import ChatFormat, CompletionFormat, ReplyFormat, sse
from pdserve.cluster.serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
)
from pdserve.cluster.serving.openai_responses import (
    ErrorInfo,
    ErrorResponse,
    UsageInfo,
)
from pdserve.cluster.serving.streaming import ClosingStream, unless_disconnected
from pdserve.engine.deploy_config import ServerSettings
from pdserve.engine.request import RequestMetrics
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.tokenizer import apply_chat_template, encode_prompt
from pdserve.router.frontend import FinishHook, OutputDelta, RequestFailedError, collect

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


class ServingFrontend(Protocol):
    """What the HTTP server needs of pdserve.router.frontend.Frontend."""

    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    on_finish: FinishHook | None  # the server points it at its metrics

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[OutputDelta]: ...


class OpenAIServing:
    """Runs /v1/completions and /v1/chat/completions requests and shapes their replies."""

    def __init__(self, frontend: ServingFrontend, settings: ServerSettings) -> None:
        self.frontend = frontend
        self.settings = settings

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        check_request(req, "completions")
        self._check_model(req.model)
        if req.echo:
            raise InvalidRequestError(
                "echo=true is not supported: send echo=false (the default)", "echo"
            )
        ids = encode_prompt(self.frontend.tokenizer, req.single_prompt())
        max_tokens = req.max_tokens
        params = self._for_model(
            req.sampling_params(
                self.settings.max_tokens_default if max_tokens is None else max_tokens,
                req.logprobs,
            )
        )
        fmt = CompletionFormat(
            self.frontend.tokenizer, self.settings.served_model_name, f"cmpl-{uuid.uuid4().hex}"
        )
        return await self._run(fmt, ids, params, req.stream, req.include_usage, request)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        check_request(req, "chat")
        for i, message in enumerate(req.messages):
            check_message_extra(message.model_extra, i)
        self._check_model(req.model)
        ids = apply_chat_template(self.frontend.tokenizer, req.message_dicts())
        max_tokens = req.max_new_tokens(len(ids), self.frontend.max_model_len)
        params = self._for_model(req.sampling_params(max_tokens, req.logprobs_count()))
        fmt = ChatFormat(
            self.frontend.tokenizer, self.settings.served_model_name, f"chatcmpl-{uuid.uuid4().hex}"
        )
        return await self._run(fmt, ids, params, req.stream, req.include_usage, request)

    def _for_model(self, params: SamplingParams) -> SamplingParams:
        return for_tokenizer(params, self.frontend.tokenizer)

    def _check_model(self, model: str | None) -> None:
        served = self.settings.served_model_name
        if model is not None and model != served:
            raise OpenAIError(
                404,
                f"model {model!r} does not exist: this server serves {served!r} (see /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def _run(
        self,
        fmt: ReplyFormat,
        ids: list[int],
        params: SamplingParams,
        stream: bool,
        include_usage: bool,
        request: Request,
    ) -> Response:
        # Validates and admits now: InvalidRequestError (400) and QueueFullError (429) escape here.
        deltas = self.frontend.stream(ids, params, fmt.request_id)
        if stream:
            events = self._events(fmt, deltas, len(ids), include_usage)
            return ClosingStream(events, "text/event-stream")
        return await unless_disconnected(request, self._collect(fmt, deltas, len(ids)))

    async def _collect(
        self, fmt: ReplyFormat, deltas: AsyncIterator[OutputDelta], num_prompt: int
    ) -> Response:
        try:
            out = await collect(deltas)
        finally:
            await close(deltas)
        usage = UsageInfo.of(num_prompt, len(out.token_ids), cached_tokens(out.metrics))
        reply = fmt.reply(out.text, out.logprobs, out.finish_reason, usage)
        return Response(reply.model_dump_json(), media_type="application/json")

    async def _events(
        self,
        fmt: ReplyFormat,
        deltas: AsyncIterator[OutputDelta],
        num_prompt: int,
        include_usage: bool,
    ) -> AsyncGenerator[str, None]:
        num_output, metrics = 0, None
        try:
            for chunk in fmt.opening():
                yield sse(chunk)
            async for d in deltas:
                num_output += len(d.token_ids)
                metrics = d.metrics or metrics
                # As vLLM: every delta that carries tokens goes out, even when its text is
                # empty (bytes of a character still incomplete), so clients can time each token.
                if d.text or d.token_ids or d.finish_reason is not None or any(d.logprobs):
                    yield sse(fmt.chunk(d.text, d.logprobs, d.finish_reason))
            if include_usage:
                usage = UsageInfo.of(num_prompt, num_output, cached_tokens(metrics))
                yield sse(fmt.usage_chunk(usage))
        except Exception as e:  # the response has started: report in-band, as OpenAI does
            yield sse(stream_error(e, fmt.request_id))
        finally:
            await close(deltas)
        yield DONE


def check_request(req: CompletionRequest | ChatCompletionRequest, endpoint: str) -> None:
    """400 for a lone surrogate in any string (no tokenizer or UTF-8 encoder takes one) and for
    fields pdserve refuses (``openai_fields``)."""
    where = find_surrogate(req.model_dump())
    if where is not None:
        raise OpenAIError(
            400,
            f"{where} holds a lone UTF-16 surrogate (such as \\ud800), which is not text: send "
            "valid Unicode (surrogates only in pairs)",
            param=where.split("[", 1)[0].split(".", 1)[0],
        )
    check_extra(req.model_extra, endpoint, type(req).model_fields)


def find_surrogate(value: object, path: str = "") -> str | None:
    """The path (``messages[0].content``) of the first string holding a lone surrogate."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items: list[tuple[str, object]] = [
            (f"{path}.{k}" if path else str(k), v) for k, v in value.items()
        ]
        items += [(f"{path}[key]", k) for k in value]
    elif isinstance(value, list | tuple):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for where, item in items:
        found = find_surrogate(item, where)
        if found is not None:
            return found
    return None


def for_tokenizer(params: SamplingParams, tokenizer: PreTrainedTokenizerBase) -> SamplingParams:
    """``params`` checked against the tokenizer's vocabulary (logit_bias, stop_token_ids) and
    given its EOS ids (what min_tokens holds back)."""
    params.check_vocab(len(tokenizer))
    eos = tokenizer.eos_token_id
    return params.with_eos(() if eos is None else (int(eos),))


def cached_tokens(metrics: RequestMetrics | None) -> int | None:
    """The prompt tokens its prefill did not compute (found in a prefix cache), as OpenAI's
    usage.prompt_tokens_details.cached_tokens; None when the request has no metrics."""
    return None if metrics is None else metrics.cached_tokens


async def close(deltas: AsyncIterator[OutputDelta]) -> None:
    """Close a frontend stream (aborting its request unless it finished)."""
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        await aclose()


def stream_error(e: Exception, request_id: str) -> ErrorResponse:
    if isinstance(e, RequestFailedError):
        message = str(e)
    else:
        logger.exception("request %s failed while streaming", request_id)
        message = f"internal error while streaming request {request_id}: {type(e).__name__}"
    return ErrorResponse(error=ErrorInfo(message=message, type="server_error"))
