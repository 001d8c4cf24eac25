"""The native API's msgpack codec: request bodies read and checked (plain values only, known
keys only), sampling maps parsed, deltas and logprobs as maps, replies packed."""

from __future__ import annotations

from typing import Any

import msgpack
from fastapi import Request, Response

from pdserve.cluster.serving.job_store import metrics_dict
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.sampling_types import TokenLogprobs
from pdserve.router.frontend import OutputDelta

MSGPACK = "application/x-msgpack"


def parse_sampling(d: object) -> SamplingParams:
    """SamplingParams from a request map; any mistake is an InvalidRequestError (400)."""
    if d is None:
        return SamplingParams()
    if not isinstance(d, dict):
        raise InvalidRequestError(f"sampling must be a map of parameters, not {type(d).__name__}")
    try:
        return SamplingParams.from_dict(d)
    except InvalidRequestError:
        raise
    except (TypeError, ValueError) as e:  # e.g. temperature="hot"
        raise InvalidRequestError(f"invalid sampling parameters {d!r}: {e}") from e


def delta_dict(d: OutputDelta) -> dict[str, Any]:
    out: dict[str, Any] = {
        "request_id": d.request_id,
        "text": d.text,
        "token_ids": d.token_ids,
        "finish_reason": d.finish_reason,
    }
    if any(lp is not None for lp in d.logprobs):
        out["logprobs"] = [logprobs_dict(lp) for lp in d.logprobs]
    if d.metrics is not None:
        out["metrics"] = metrics_dict(d.metrics)
    return out


def logprobs_dict(lp: TokenLogprobs | None) -> dict[str, Any] | None:
    return None if lp is None else {"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top}


def pack(obj: Any) -> Response:
    return Response(content=msgpack.packb(obj), media_type=MSGPACK)


def _no_ext(code: int, data: bytes) -> Any:
    raise InvalidRequestError(f"msgpack ext type {code} is not accepted: send plain values")


async def read_body(request: Request, allowed: set[str]) -> dict[str, Any]:
    """The body as a msgpack map with only ``allowed`` keys, read at most to the limit."""
    raw = await request.body()  # bounded by the server's BodyLimitMiddleware (413)
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except InvalidRequestError:
        raise
    except ValueError as e:  # msgpack's FormatError, ExtraData, StackError...
        raise InvalidRequestError(
            f"the body is not valid msgpack ({e or type(e).__name__}): "
            f"send one msgpack map with Content-Type: {MSGPACK}"
        ) from e
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the body must be a msgpack map, not {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {unknown}; known: {sorted(allowed)}")
    return body
