"""The native API the client library speaks: msgpack bodies both ways, under ``/pdserve/v1``.

=========================  ============================================  ======================
route                      request body (msgpack map)                    response (msgpack)
=========================  ============================================  ======================
POST /generate             {prompt | messages, sampling?, request_id?}   {request_id, text,
                                                                         token_ids,
                                                                         finish_reason, metrics}
POST /stream               same                                          delta maps (below)
POST /cancel/{request_id}  -                                             {request_id, cancelled}
POST /jobs                 {prompts, sampling?, name?}                   JobInfo map
GET  /jobs                 -                                             [JobInfo map, ...]
GET  /jobs/{id}            -                                             JobInfo map
GET  /jobs/{id}/results    ?start=N&limit=M                              [result map, ...]
DELETE /jobs/{id}          -                                             JobInfo map
=========================  ============================================  ======================

``prompt`` is text (tokenized as is: a raw completion) or token ids; ``messages`` is a chat
(``[{role, content}, ...]``) rendered with the model's chat template, as /v1/chat/completions
does. Send one of the two.

Stream framing: the body of ``/stream`` is a sequence of msgpack maps written back to back with
no separator (msgpack values delimit themselves): feed the chunks to ``msgpack.Unpacker`` and
iterate. Each map is a delta ``{request_id, text, token_ids, finish_reason, logprobs?,
metrics?}``; the last has a non-null ``finish_reason`` ("cancelled" after a cancel) and metrics.
An error after the stream started arrives as a final ``{"error": {"message", "type"}}`` map.

Errors before a response starts are the server's JSON error objects (400, 404, 413, 429, 500).
Bodies are bounded by the server (``server.max_request_bytes``, 413) and decoded without ext
types; never pickle (the codec is ``native_wire``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Protocol

import msgpack
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from transformers import PreTrainedTokenizerBase

from pdserve.cluster.serving.job_store import metrics_dict
from pdserve.cluster.serving.jobs import Generator, JobInfo, JobManager, check_prompt
from pdserve.cluster.serving.native_wire import (
    MSGPACK,
    delta_dict,
    logprobs_dict,
    pack,
    parse_sampling,
    read_body,
)
from pdserve.cluster.serving.openai_protocol import OpenAIError
from pdserve.cluster.serving.openai_serving import for_tokenizer
from pdserve.cluster.serving.streaming import ClosingStream, unless_disconnected
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.tokenizer import apply_chat_template
from pdserve.router.frontend import OutputDelta, collect

logger = logging.getLogger(__name__)

PREFIX = "/pdserve/v1"
RESULTS_PAGE = 1000  # results per GET /jobs/{id}/results unless ?limit= says otherwise
MAX_RESULTS_PAGE = 10_000


class StreamingFrontend(Generator, Protocol):
    """What the native API needs from the Frontend: ``generate`` for jobs, ``stream`` here, the
    tokenizer for chats."""

    tokenizer: PreTrainedTokenizerBase

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[OutputDelta]: ...


class _Run:
    """One generate/stream in flight. A task pumps the frontend's deltas into a queue, so a
    cancel, or the client going away, cancels that task, which closes the frontend stream and
    so aborts the request in the cluster."""

    def __init__(self, stream: AsyncIterator[OutputDelta], request_id: str) -> None:
        self.request_id = request_id
        # deltas, then None at the end; an exception to re-raise in the reader
        self._queue: asyncio.Queue[OutputDelta | Exception | None] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump(stream))
        self.task.add_done_callback(self._done)

    async def _pump(self, stream: AsyncIterator[OutputDelta]) -> None:
        try:
            async for delta in stream:
                self._queue.put_nowait(delta)
        except Exception as e:  # handed to the reader, which raises it
            self._queue.put_nowait(e)

    def _done(self, task: asyncio.Task[None]) -> None:
        # here, not in _pump: a task cancelled before its first step never runs _pump's code
        if task.cancelled():
            self._queue.put_nowait(OutputDelta(self.request_id, "", [], finish_reason="cancelled"))
        self._queue.put_nowait(None)

    async def deltas(self) -> AsyncIterator[OutputDelta]:
        while (item := await self._queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class NativeApi:
    """Routes of the native API (see the module docstring); ``router`` goes to create_app.

    ``jobs`` is None when the deployment keeps no jobs directory: the job routes then answer 404.
    """

    def __init__(self, frontend: StreamingFrontend, jobs: JobManager | None) -> None:
        self.frontend = frontend
        self.jobs = jobs
        self.runs: dict[str, _Run] = {}  # request_id -> generate/stream in flight, for cancel
        r = APIRouter(prefix=PREFIX, tags=["native"])
        r.add_api_route("/generate", self.generate, methods=["POST"])
        r.add_api_route("/stream", self.stream, methods=["POST"])
        r.add_api_route("/cancel/{request_id}", self.cancel, methods=["POST"])
        r.add_api_route("/jobs", self.submit_job, methods=["POST"])
        r.add_api_route("/jobs", self.list_jobs, methods=["GET"])
        r.add_api_route("/jobs/{job_id}", self.job_status, methods=["GET"])
        r.add_api_route("/jobs/{job_id}/results", self.job_results, methods=["GET"])
        r.add_api_route("/jobs/{job_id}", self.cancel_job, methods=["DELETE"])
        self.router = r

    async def generate(self, request: Request) -> Response:
        run = await self._start(request)
        return await unless_disconnected(request, self._collect(run))

    async def stream(self, request: Request) -> StreamingResponse:
        run = await self._start(request)
        return ClosingStream(self._frames(run), MSGPACK)

    async def cancel(self, request_id: str) -> Response:
        run = self.runs.get(request_id)
        cancelled = run is not None and run.task.cancel()
        return pack({"request_id": request_id, "cancelled": cancelled})

    async def submit_job(self, request: Request) -> Response:
        jobs = self._jobs()
        body = await read_body(request, {"prompts", "sampling", "name"})
        params = self._sampling(body.get("sampling"))
        info = await jobs.submit(body.get("prompts"), params, body.get("name"))
        return pack(info.to_dict())

    async def list_jobs(self) -> Response:
        return pack([info.to_dict() for info in self._jobs().list()])

    async def job_status(self, job_id: str) -> Response:
        return pack(self._info(job_id).to_dict())

    async def job_results(
        self,
        job_id: str,
        start: int = Query(0, ge=0),
        limit: int = Query(RESULTS_PAGE, ge=1, le=MAX_RESULTS_PAGE),
    ) -> Response:
        self._info(job_id)
        return pack(list(self._jobs().iter_results(job_id, start, limit)))

    async def cancel_job(self, job_id: str) -> Response:
        self._info(job_id)
        return pack((await self._jobs().cancel(job_id)).to_dict())

    async def _start(self, request: Request) -> _Run:
        """Parse a generate/stream body and admit it (InvalidRequestError, QueueFullError)."""
        body = await read_body(request, {"prompt", "messages", "sampling", "request_id"})
        prompt = self._prompt(body)
        params = self._sampling(body.get("sampling"))
        request_id = body.get("request_id") or uuid.uuid4().hex
        if not isinstance(request_id, str) or len(request_id) > 200:
            raise InvalidRequestError("request_id must be a string of at most 200 characters")
        if request_id in self.runs:
            raise InvalidRequestError(f"request_id {request_id!r} is in use: pick a fresh one")
        run = _Run(self.frontend.stream(prompt, params, request_id), request_id)
        self.runs[request_id] = run
        run.task.add_done_callback(lambda _: self._forget(run))
        return run

    def _prompt(self, body: dict[str, Any]) -> str | list[int]:
        """The body's ``prompt``, or its ``messages`` rendered with the chat template."""
        if ("prompt" in body) == ("messages" in body):
            raise InvalidRequestError("send either prompt (text or token ids) or messages (a chat)")
        if "prompt" in body:
            return check_prompt(body["prompt"])  # "" is BOS alone, as /v1/completions
        messages = body["messages"]
        if not isinstance(messages, list):
            raise InvalidRequestError("messages must be a list of {role, content} maps")
        return apply_chat_template(self.frontend.tokenizer, messages)

    def _sampling(self, d: object) -> SamplingParams:
        params = parse_sampling(d)
        tokenizer = self.frontend.tokenizer
        return params if tokenizer is None else for_tokenizer(params, tokenizer)

    def _forget(self, run: _Run) -> None:
        if self.runs.get(run.request_id) is run:
            del self.runs[run.request_id]

    async def _collect(self, run: _Run) -> Response:
        try:
            out = await collect(run.deltas())
        finally:
            run.task.cancel()  # no-op once finished; aborts the request if we were cancelled
        reply: dict[str, Any] = {
            "request_id": run.request_id,
            "text": out.text,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "metrics": None if out.metrics is None else metrics_dict(out.metrics),
        }
        if any(lp is not None for lp in out.logprobs):
            reply["logprobs"] = [logprobs_dict(lp) for lp in out.logprobs]
        return pack(reply)

    async def _frames(self, run: _Run) -> AsyncGenerator[bytes, None]:
        try:
            async for delta in run.deltas():
                yield msgpack.packb(delta_dict(delta))
        except Exception as e:  # the status line is gone: report in-band, then end the stream
            logger.warning("stream %s failed: %s", run.request_id, e)
            yield msgpack.packb({"error": {"message": str(e), "type": type(e).__name__}})
        finally:
            run.task.cancel()  # the client went away (or we are done): abort the request

    def _jobs(self) -> JobManager:
        if self.jobs is None:
            raise OpenAIError(
                404,
                "this deployment runs no batch jobs: set server.jobs_dir",
                type="not_found_error",
            )
        return self.jobs

    def _info(self, job_id: str) -> JobInfo:
        try:
            return self._jobs().status(job_id)
        except KeyError:
            raise OpenAIError(
                404, f"no job {job_id!r}: `pdserve jobs` lists them", type="not_found_error"
            ) from None


def make_native_router(frontend: StreamingFrontend, jobs: JobManager | None) -> APIRouter:
    """The native API's routes, to pass to ``create_app(extra_routers=[...])`` (whose
    middleware bounds every body to ``server.max_request_bytes``)."""
    return NativeApi(frontend, jobs).router
