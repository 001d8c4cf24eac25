"""The server's pure-ASGI middlewares and its error replies: the API key check, the body-size and
body-time bounds, and ``error_response`` (an OpenAI error object as ASCII JSON)."""

from __future__ import annotations

import asyncio
import hmac
import json

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.cluster.serving.http_server import BODY_TIMEOUT_S, MAX_HEADER_BYTES
from pdserve.cluster.serving.openai_protocol import ErrorType, OpenAIError

OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancer probes)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def error_response(
    status: int,
    message: str,
    *,
    type: ErrorType = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An OpenAI error object with ``status``."""
    return render_error(
        OpenAIError(status, message, type=type, param=param, code=code, headers=headers)
    )


def render_error(e: OpenAIError) -> Response:
    # ASCII JSON: a message quoting a lone surrogate still encodes (UTF-8 would raise mid-reply)
    body = json.dumps(e.body.model_dump(), ensure_ascii=True)
    return Response(body, status_code=e.status, headers=e.headers, media_type="application/json")


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer KEY`` on every route but /health (routers included)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401,
            "missing or incorrect API key: send the header 'Authorization: Bearer <key>' with "
            "the key this server was started with",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = _header(scope, b"authorization") or b""
        return hmac.compare_digest(given, self._expected)


class BodyLimitMiddleware:
    """Answers 413 for bodies over ``limit`` bytes, declared (Content-Length) or streamed, and
    408 for a body that has not arrived whole within ``timeout_s``.

    The body is read here, bounded, and replayed to the app; later messages (the disconnect)
    pass through, so streaming responses still see the client go away.
    """

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s  # the whole body's deadline: a slow sender holds no slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) for k, v in scope["headers"])
            if size > MAX_HEADER_BYTES:
                message = (
                    f"the request headers hold {size} bytes, over this server's limit of "
                    f"{MAX_HEADER_BYTES} bytes: send fewer or shorter headers"
                )
                await error_response(431, message)(scope, receive, send)
                return
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            message = (
                f"the request body did not arrive within {self.timeout_s:g} s: send it at once"
            )
            await error_response(408, message, headers={"Connection": "close"})(
                scope, receive, send
            )
            return
        if body is None:  # the client went away
            return
        if len(body) > self.limit:
            await self._too_large(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The body, or None when the client left; stops early once over the limit."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.limit or not message.get("more_body", False):
                return bytes(body)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"the request body is over this server's limit of {self.limit} bytes: send a "
            "smaller request (or raise server.max_request_bytes in the deploy spec)"
        )
        await error_response(413, message)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
