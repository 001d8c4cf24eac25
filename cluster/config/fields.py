"""The values a deploy spec's keys take: the choices, the validators and the annotated types
the sections in ``schema`` are built from. Each validator raises ``ValueError`` with a message
that says what to write instead."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PlainValidator

from pdserve.cluster.config.errors import did_you_mean
from pdserve.engine.builtin_models import BUILTIN_MODELS, BUILTIN_PREFIX, DEFAULT_MODEL

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
KV_BACKENDS = ("auto", "nccl", "gloo", "host", "cuda_ipc")  # kv_transfer.peers.BACKENDS
QUANTIZATIONS = ("none", "int8", "int4")  # weight-only: int8 per output channel, int4 group-wise
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8_e4m3", "int8")
QUANTIZED_KV_DTYPES = ("fp8_e4m3", "int8")  # scaled formats: read only through the sdpa path
MODES = ("disaggregated", "colocated")
# Ray asks for these per actor itself (one CPU or GPU slot each); a spec lists custom ones only.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ADDRESS_RE = re.compile(r"(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_MEMORY_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def one_of(*choices: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(
                f"must be one of {', '.join(choices)}, got {value!r}{did_you_mean(value, choices)}"
            )
        return value

    return AfterValidator(check)


def check(predicate: Callable[[Any], bool], requirement: str) -> AfterValidator:
    def check(value: Any) -> Any:
        if not predicate(value):
            raise ValueError(f"{requirement}, got {value!r}")
        return value

    return AfterValidator(check)


def _auto_or_positive_int(value: Any) -> int | Literal["auto"]:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value  # type: ignore[no-any-return]
    raise ValueError(f"must be auto or a positive integer, got {value!r}")


def _capture_sizes(value: Any) -> tuple[int, ...] | None:
    """A list of positive batch sizes, kept sorted and without repeats; None: auto."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and value
    if not ok or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value):
        raise ValueError(f"must be a list of batch sizes such as [1, 2, 4, 8], got {value!r}")
    return tuple(sorted(set(value)))


def parse_memory(value: Any) -> int | None:
    """Bytes from ``2GiB``, ``512MiB``, ``1.5GB`` or a plain integer count of bytes."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _MEMORY_RE.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if match is None or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f'must be a size such as "512MiB", "2GiB" or "8GB", got {value!r}')
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def check_resources(value: dict[str, float]) -> dict[str, float]:
    for key in value:
        if key in RAY_BUILTIN_RESOURCES:
            raise ValueError(
                f"{key!r} is requested per actor already (one GPU on cuda, one CPU on cpu); "
                "list custom resources only, e.g. {prefill: 1}"
            )
    return value


def check_model_path(value: str) -> str:
    if not value.strip():
        raise ValueError(
            "must be a local model directory, a .gguf file or a built-in name such as "
            f"{BUILTIN_PREFIX}{DEFAULT_MODEL}"
        )
    name = value.removeprefix(BUILTIN_PREFIX)
    if value.startswith(BUILTIN_PREFIX) and name not in BUILTIN_MODELS:
        builtins = [BUILTIN_PREFIX + m for m in BUILTIN_MODELS]
        raise ValueError(
            f"unknown built-in model {value!r}{did_you_mean(value, builtins)}; "
            f"choose one of {', '.join(builtins)}"
        )
    return value


def check_api_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not value:
        raise ValueError('must be null (no key), a literal key, or "env:VARNAME", got ""')
    var = value.removeprefix("env:")
    if value.startswith("env:") and not _ENV_RE.fullmatch(var):
        raise ValueError(
            f'"env:" must be followed by a variable name such as PDSERVE_API_KEY, got {value!r}'
        )
    return value


def check_address(value: str | None) -> str | None:
    if value is None or value == "auto" or _ADDRESS_RE.fullmatch(value):
        return value
    raise ValueError(f"must be null (start a local Ray), auto, or host:port, got {value!r}")


Positive = Annotated[int, Field(ge=1)]
GPUShare = Annotated[float, Field(gt=0, le=1)]
Resources = Annotated[dict[str, Annotated[float, Field(gt=0)]], AfterValidator(check_resources)]
AutoInt = Annotated[int | Literal["auto"], PlainValidator(_auto_or_positive_int)]
Memory = Annotated[int | None, PlainValidator(parse_memory)]
CaptureSizes = Annotated[tuple[int, ...] | None, PlainValidator(_capture_sizes)]
NonEmpty = Annotated[str, check(lambda s: bool(s.strip()), "must not be empty")]
