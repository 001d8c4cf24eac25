"""The HTTP server: an OpenAI-compatible API, health, status and Prometheus metrics (FastAPI).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (never needs
the API key), GET /metrics, GET /status; plus any routers passed in (the native msgpack API).
Every error is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``.

Two pure-ASGI middlewares wrap every route: the API key check (when configured) and the body-size
limit, which counts streamed bytes too, so a chunked upload cannot bypass Content-Length.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from pdserve.cluster.serving.http_server import BODY_TIMEOUT_S
from pdserve.cluster.serving.metrics import CONTENT_TYPE, ServingMetrics
from pdserve.cluster.serving.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    error_response,
    render_error,
)
from pdserve.cluster.serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorType,
    OpenAIError,
)
from pdserve.cluster.serving.openai_responses import (
    ModelCard,
    ModelList,
)
from pdserve.cluster.serving.openai_serving import OpenAIServing, ServingFrontend
from pdserve.engine.deploy_config import ServerSettings
from pdserve.engine.sampling_params import InvalidRequestError
from pdserve.router.frontend import QueueFullError, RequestFailedError
from pdserve.router.router import NoCapacityError

logger = logging.getLogger(__name__)


def create_app(
    frontend: ServingFrontend,
    settings: ServerSettings,
    *,
    extra_routers: Sequence[APIRouter] = (),
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    metrics: ServingMetrics | None = None,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The app serving ``frontend``; ``app.state.metrics`` is its ServingMetrics, fed by the
    frontend's finish hook, so requests of every API (OpenAI, native, batch jobs) are counted."""
    metrics = metrics or ServingMetrics(settings.served_model_name)
    frontend.on_finish = metrics.observe_request
    if hasattr(frontend, "on_failure"):  # an AdmissionGate counts failed requests
        frontend.on_failure = metrics.observe_failure
    app = FastAPI(title="pdserve", summary="Disaggregated prefill/decode LLM serving")
    app.state.metrics = metrics
    app.include_router(_openai_routes(OpenAIServing(frontend, settings)))
    app.include_router(_ops_routes(frontend, settings, metrics, status))
    for router in extra_routers:
        app.include_router(router)
    _install_error_handlers(app)
    # The last added runs first: the key is checked before the body is read.
    app.add_middleware(
        BodyLimitMiddleware, limit=settings.max_request_bytes, timeout_s=body_timeout_s
    )
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    return app


def _openai_routes(serving: OpenAIServing) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    return router


def _ops_routes(
    frontend: ServingFrontend,
    settings: ServerSettings,
    metrics: ServingMetrics,
    status: Callable[[], Awaitable[dict[str, Any]]] | None,
) -> APIRouter:
    router = APIRouter()
    started = int(time.time())
    card = ModelCard(
        id=settings.served_model_name, created=started, max_model_len=frontend.max_model_len
    )

    @router.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card])

    @router.get("/v1/models/{model:path}")
    async def model(model: str) -> ModelCard:
        if model != card.id:
            raise OpenAIError(404, f"model {model!r} does not exist", code="model_not_found")
        return card

    @router.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @router.get("/status")
    async def status_route() -> dict[str, Any]:
        if status is None:
            return {"model": settings.served_model_name, "state": "serving"}
        return await status()

    return router


# -- errors -------------------------------------------------------------------------------------


_HTTP_TYPES: dict[int, ErrorType] = {401: "authentication_error", 404: "not_found_error"}


def _install_error_handlers(app: FastAPI) -> None:
    async def openai_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, OpenAIError)
        return render_error(e)

    async def http_error(request: Request, e: Exception) -> Response:
        # Starlette's own answers (no such route 404, wrong method 405...), which FastAPI would
        # send as {"detail": ...}
        assert isinstance(e, HTTPException)
        message = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code == 404:
            message += " (see /docs for the routes)"
        kind = _HTTP_TYPES.get(e.status_code, "invalid_request_error")
        if e.status_code >= 500:
            kind = "server_error"
        headers = dict(e.headers) if e.headers else None
        return error_response(e.status_code, message, type=kind, headers=headers)

    async def invalid(_: Request, e: Exception) -> Response:
        # SamplingParams names the field first ("temperature=-1 is invalid: ..."): it is the param.
        assert isinstance(e, InvalidRequestError)
        named = re.match(r"(\w+)=", str(e))
        return error_response(400, str(e), param=e.param or (named.group(1) if named else None))

    async def validation(_: Request, e: Exception) -> Response:
        assert isinstance(e, RequestValidationError)
        message, param = _describe_validation(e.errors())
        return error_response(400, message, param=param)

    async def queue_full(_: Request, e: Exception) -> Response:
        assert isinstance(e, QueueFullError)
        retry = str(max(1, math.ceil(e.retry_after)))
        return error_response(
            429, str(e), type="requests", code="rate_limit_exceeded", headers={"Retry-After": retry}
        )

    async def failed(_: Request, e: Exception) -> Response:
        return error_response(500, str(e), type="server_error")

    async def unavailable(_: Request, e: Exception) -> Response:
        # a pool with no live instance, or a prompt no decode replica can ever hold
        return error_response(503, str(e), type="service_unavailable")

    async def unexpected(request: Request, e: Exception) -> Response:
        logger.error("unhandled error serving %s", request.url.path, exc_info=e)
        return error_response(
            500, f"internal server error: {type(e).__name__}", type="server_error"
        )

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(InvalidRequestError, invalid)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(QueueFullError, queue_full)
    app.add_exception_handler(RequestFailedError, failed)
    app.add_exception_handler(NoCapacityError, unavailable)
    app.add_exception_handler(Exception, unexpected)


def _describe_validation(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A message naming the first bad field (pydantic's 422 detail, as a 400)."""
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg', '')}", None
    if not loc:
        return "the request body is missing or not a JSON object: send a JSON object", None
    # Union members show up as extra loc parts ("prompt.str"); the top-level field is the param.
    param = loc[0]
    return f"invalid value for {'.'.join(loc)!r}: {first.get('msg', 'invalid')}", param
