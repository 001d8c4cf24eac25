"""Exact admission: at most ``limit`` requests in flight, counted when admitted.

The gate counts a request in the same synchronous call that checks the bound, before any
``await``, so a burst of simultaneous requests cannot all pass the check before any of them is
counted (the frontend counts a stream when it starts, one hop later). Every API (OpenAI, native,
batch jobs) goes through the one gate. A refused request gets ``QueueFullError`` with
``retry_after`` from the queue: the requests in flight divided by the completion rate of the
last ``RATE_WINDOW_S`` seconds (clamped to [1, 60] s; 10 s while nothing has completed).
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from pdserve.engine.request import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.frontend import FinishHook, OutputDelta, QueueFullError, RequestFailedError
from pdserve.router.router import NoCapacityError

RATE_WINDOW_S = 10.0
MIN_RETRY_S, MAX_RETRY_S, IDLE_RETRY_S = 1.0, 60.0, 10.0


class AdmissionGate:
    """Wraps a Frontend (``stream``, ``generate``, its tokenizer and finish hook) with an exact
    bound on the requests in flight."""

    def __init__(self, frontend: Any, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit={limit}: admit at least one request")
        self.frontend = frontend
        self.limit = limit
        self.inflight = 0
        self._finished: collections.deque[float] = collections.deque()
        # called with a reason for each request that fails or is refused (the server's /metrics)
        self.on_failure: Callable[[str], None] | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer: PreTrainedTokenizerBase = self.frontend.tokenizer
        return tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.frontend.max_model_len)

    @property
    def on_finish(self) -> FinishHook | None:
        hook: FinishHook | None = self.frontend.on_finish
        return hook

    @on_finish.setter
    def on_finish(self, hook: FinishHook | None) -> None:
        self.frontend.on_finish = hook

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[OutputDelta]:
        """The frontend's stream, admitted now (QueueFullError when full; InvalidRequestError
        from the frontend's checks), released when it ends, is closed or is dropped."""
        self._admit()
        try:
            inner = self.frontend.stream(prompt, params, request_id)
        except BaseException as e:
            self._release()
            self._failed(e)
            raise
        return _Admitted(inner, self._release, self._failed)

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestOutput:
        self._admit()
        try:
            out: RequestOutput = await self.frontend.generate(prompt, params, request_id)
            return out
        except BaseException as e:
            self._failed(e)
            raise
        finally:
            self._release()

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained enough to admit: in flight / rate."""
        now = time.monotonic()
        while self._finished and self._finished[0] < now - RATE_WINDOW_S:
            self._finished.popleft()
        if not self._finished:
            return IDLE_RETRY_S
        rate = len(self._finished) / RATE_WINDOW_S
        return min(MAX_RETRY_S, max(MIN_RETRY_S, self.inflight / rate))

    def _admit(self) -> None:
        if self.inflight >= self.limit:
            self._count("queue_full")
            raise QueueFullError(self.limit, retry_after=self.retry_after())
        self.inflight += 1

    def _failed(self, e: BaseException) -> None:
        """Count a request's error; a caller's own mistake (4xx) or going away is no failure."""
        if isinstance(e, RequestFailedError):
            self._count("failed")
        elif isinstance(e, NoCapacityError):
            self._count("unavailable")
        elif isinstance(e, QueueFullError):
            self._count("queue_full")
        elif isinstance(e, Exception) and not isinstance(e, ValueError | StopAsyncIteration):
            self._count("internal")

    def _count(self, reason: str) -> None:
        if self.on_failure is not None:
            self.on_failure(reason)

    def _release(self) -> None:
        self.inflight -= 1
        self._finished.append(time.monotonic())


class _Admitted:
    """An admitted stream: passes the deltas through and releases its slot exactly once, when
    it ends, fails, is closed, or is garbage-collected without ever being read."""

    def __init__(
        self,
        inner: AsyncIterator[OutputDelta],
        release: Callable[[], None],
        failed: Callable[[BaseException], None],
    ) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release
        self._failed = failed

    def __aiter__(self) -> _Admitted:
        return self

    async def __anext__(self) -> OutputDelta:
        try:
            return await self._inner.__anext__()
        except BaseException as e:
            if self._release is not None:
                self._failed(e)
            self._done()
            raise

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._inner, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._done()

    def _done(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:
        self._done()
