"""The pieces of a `--workload` spec: its KEY=VALUE options, length distributions, and the shape
of one request. `workloads` (lengths only, traces) and `reuse_workloads` (shared prefixes,
conversations) build on them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WORKLOAD_EXAMPLES = (
    "fixed:in=256,out=64 | uniform:in=64-512,out=16-128 | "
    "lognormal:in_mean=512,out_mean=128 | trace:PATH[,speedup=F] | trace:PATH,timestamps=false"
    " | trace:PATH,scale=F | chat | chat:in_mean=256,out_mean=128 | chat:in=64-512,out=16-128"
    " | shared-prefix:groups=4,system=512,in=64,out=64 | multi-turn:turns=4,system=256,in=64"
)


class WorkloadError(ValueError):
    """A --workload spec that cannot be used; the message says what to write instead."""


@dataclass(frozen=True)
class RequestShape:
    """Lengths of one request: prompt tokens sent, tokens asked for (EOS ignored). Workloads
    with prefix reuse say what its prompt shares: its group's prefix (a system prompt) of
    `shared_len` tokens, or (a later turn of a conversation) the whole prompt and answer of
    request `follows`, which must be back before this one is sent."""

    input_len: int
    output_len: int
    group: int = -1  # >= 0: the prompt starts with that group's shared prefix
    shared_len: int = 0
    follows: int | None = None  # index of the turn this one continues

    @property
    def reuses(self) -> bool:
        return self.group >= 0 or self.follows is not None


@dataclass(frozen=True)
class Fixed:
    n: int

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.full(size, self.n, dtype=np.int64)


@dataclass(frozen=True)
class Uniform:
    lo: int
    hi: int  # inclusive

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.integers(self.lo, self.hi + 1, size=size)


@dataclass(frozen=True)
class LogNormal:
    mean: float  # arithmetic mean of the lengths
    sigma: float  # std of the underlying normal

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        # E[exp(N(mu, s^2))] = exp(mu + s^2 / 2), so mu = ln(mean) - s^2 / 2
        mu = math.log(self.mean) - self.sigma**2 / 2
        return np.rint(rng.lognormal(mu, self.sigma, size=size)).astype(np.int64)


LengthDist = Fixed | Uniform | LogNormal


def key_values(spec: str, text: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise WorkloadError(
                f"--workload {spec!r}: {item!r} is not KEY=VALUE; write e.g. {WORKLOAD_EXAMPLES}"
            )
        keys[key.strip().lower()] = value.strip()
    return keys


def expect(
    spec: str, keys: dict[str, str], required: Sequence[str], optional: Sequence[str] = ()
) -> None:
    allowed = (*required, *optional)
    for key in keys:
        if key not in allowed:
            raise WorkloadError(
                f"--workload {spec!r}: unknown key {key!r}; this kind takes {', '.join(allowed)}"
            )
    missing = [k for k in required if k not in keys]
    if missing:
        raise WorkloadError(f"--workload {spec!r}: missing {', '.join(missing)}; see --help")


def count(spec: str, keys: dict[str, str], key: str) -> int:
    value = keys[key]
    if not value.isdigit() or int(value) < 1:
        raise WorkloadError(f"--workload {spec!r}: {key}={value} must be a whole number >= 1")
    return int(value)


def length_range(spec: str, keys: dict[str, str], key: str) -> Uniform:
    lo_text, _, hi_text = keys[key].partition("-")
    lo = count(spec, {key: lo_text}, key)
    hi = count(spec, {key: hi_text or lo_text}, key)
    if hi < lo:
        raise WorkloadError(f"--workload {spec!r}: {key}={keys[key]} must be LOW-HIGH, LOW <= HIGH")
    return Uniform(lo, hi)


def positive(spec: str, keys: dict[str, str], key: str, default: float | None = None) -> float:
    if key not in keys and default is not None:
        return default
    try:
        value = float(keys[key])
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise WorkloadError(f"--workload {spec!r}: {key}={keys[key]} must be a number > 0")
    return value
