"""Responses tied to a request's life: a stream whose source is closed however the response
ends, and a reply that is cancelled when its client leaves. Either way the request's iterator is
closed at once, which aborts it in the cluster and frees its KV blocks on both sides."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Coroutine
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

CLIENT_CLOSED = 499  # nginx's code; nobody reads it, the client is gone


class ClosingStream(StreamingResponse):
    """A streaming response whose source is closed however the response ends, so a client that
    goes away aborts its request at once instead of when the generator is garbage-collected."""

    def __init__(self, source: AsyncGenerator[Any, None], media_type: str) -> None:
        super().__init__(
            source,
            media_type=media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: the abort it triggers must finish even when this task is being cancelled.
            with anyio.CancelScope(shield=True):
                await self._source.aclose()


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, Response]) -> Response:
    """Run ``work``; cancel it (closing its stream, aborting the request) if the client leaves."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=CLIENT_CLOSED)
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body is read already, so the next message the server has for us is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
