"""Workloads: the input/output lengths of a benchmark's requests, and for a trace its arrivals.

The `--workload` syntax is WORKLOAD_HELP below. Every length is at least 1, and with a known
model context input + output fits in it: the prompt is cut to leave room for at least one
token, then the output to what remains. What the prompts hold (random token ids or real text)
is `bench.serve.prompts`; a workload only says whether it asks for text (`chat`).

A trace's `scale=F` maps a length L above SCALE_FLOOR tokens to
SCALE_FLOOR + (L - SCALE_FLOOR) x F (rounded) and keeps shorter ones as they are: the lengths
shrink toward the floor, keeping their order and the shape of the distribution above it,
instead of collapsing to 1 token (a plain L x F made every output under 15 tokens 1 token at
F = 0.1, and at F = 0.01 every one under 150: over half of the Azure conversation trace's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdserve.bench.serve.arrivals import replay_times
from pdserve.bench.serve.traces import TraceRow, load_trace

WORKLOAD_HELP = """\
what to send (lengths in tokens):
  fixed:in=256,out=64                    every request the same
  uniform:in=64-512,out=16-128           uniform in the inclusive ranges
  lognormal:in_mean=512,out_mean=128[,in_sigma=0.5,out_sigma=0.5]
                                         log-normal with these means (sigma: of log length)
  trace:PATH[,speedup=F]                 Azure trace CSV (TIMESTAMP,ContextTokens,
                                         GeneratedTokens): its first --num-prompts rows at
                                         their own timestamps, F times faster (default 1)
  trace:PATH,timestamps=false            the trace's lengths (rows drawn at random, seeded)
                                         sent at --request-rate / --burstiness
  trace:PATH,...,scale=F                 lengths above 16 tokens shrink (or grow) toward 16:
                                         L -> 16 + (L - 16) x F, shorter ones are kept; e.g.
                                         scale=0.25 for a CPU-sized version of the trace
  chat[:in_mean=256,out_mean=128,in_sigma=0.5,out_sigma=0.5]
  chat:in=64-512,out=16-128              prompts of real English text (public-domain prose
                                         shipped with pdserve) phrased as requests, lengths
                                         log-normal (the default) or as in fixed/uniform
Token ids on /v1/completions; text on /v1/chat/completions (every workload) and for chat.
Lengths are clipped to the model's context (from /v1/models or --max-model-len)."""
WORKLOAD_EXAMPLES = (
    "fixed:in=256,out=64 | uniform:in=64-512,out=16-128 | "
    "lognormal:in_mean=512,out_mean=128 | trace:PATH[,speedup=F] | trace:PATH,timestamps=false"
    " | trace:PATH,scale=F | chat | chat:in_mean=256,out_mean=128 | chat:in=64-512,out=16-128"
)
SCALE_FLOOR = 16  # tokens: a trace's scale= never takes a length below min(length, this)
CHAT_MEANS = (256.0, 128.0)  # `chat` without lengths: log-normal input and output means


class WorkloadError(ValueError):
    """A --workload spec that cannot be used; the message says what to write instead."""


@dataclass(frozen=True)
class RequestShape:
    """Lengths of one request: prompt tokens sent, tokens asked for (EOS ignored)."""

    input_len: int
    output_len: int


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


@dataclass(frozen=True)
class SyntheticWorkload:
    """Independent input and output length distributions; arrivals come from the rate.
    `text`: the prompts are real English text (the `chat` kind), not random token ids."""

    spec: str
    input: LengthDist
    output: LengthDist
    text: bool = False
    replays_timestamps = False

    def sample(self, n: int, seed: int) -> list[RequestShape]:
        rng = np.random.default_rng(seed)
        ins, outs = self.input.sample(rng, n), self.output.sample(rng, n)
        return [RequestShape(int(i), int(o)) for i, o in zip(ins, outs)]


@dataclass(frozen=True)
class TraceWorkload:
    """Rows of a trace CSV; `speedup` set: replay its timestamps, None: only its lengths.
    Lengths are scaled by `scale` toward SCALE_FLOOR (scaled_length)."""

    spec: str
    path: Path
    rows: tuple[TraceRow, ...]
    speedup: float | None
    scale: float = 1.0
    text = False

    @property
    def replays_timestamps(self) -> bool:
        return self.speedup is not None

    def sample(self, n: int, seed: int) -> list[RequestShape]:
        """Replay: the first n rows in order. Lengths only: n rows drawn at random (seeded)."""
        if self.replays_timestamps:
            picked: Sequence[TraceRow] = self._first(n)
        else:
            rng = np.random.default_rng(seed)
            idx = rng.choice(len(self.rows), size=n, replace=n > len(self.rows))
            picked = [self.rows[int(i)] for i in idx]
        return [
            RequestShape(
                scaled_length(r.input_len, self.scale), scaled_length(r.output_len, self.scale)
            )
            for r in picked
        ]

    def arrival_times(self, n: int) -> list[float]:
        """Seconds from the start of the first n rows, compressed `speedup` times."""
        assert self.speedup is not None, "arrival_times() is for trace replay"
        return replay_times([r.timestamp_s for r in self._first(n)], self.speedup)

    def _first(self, n: int) -> Sequence[TraceRow]:
        if n > len(self.rows):
            raise WorkloadError(
                f"--num-prompts {n} exceeds the {len(self.rows)} rows of {self.path}: ask for "
                f"at most {len(self.rows)}, or add timestamps=false to draw rows at random"
            )
        return self.rows[:n]


Workload = SyntheticWorkload | TraceWorkload


def scaled_length(n: int, scale: float) -> int:
    """A trace length under scale=F: n if n <= SCALE_FLOOR, else SCALE_FLOOR + (n - SCALE_FLOOR) x F
    rounded; at least 1 (a trace's 0 becomes 1, as every length does)."""
    if n <= SCALE_FLOOR:
        return max(1, n)
    return max(1, round(SCALE_FLOOR + (n - SCALE_FLOOR) * scale))


def parse_workload(spec: str) -> Workload:
    """Parse a --workload string (syntax: WORKLOAD_HELP)."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "trace":
        return _parse_trace(spec, rest)
    if kind == "chat":
        return _parse_chat(spec, rest)
    if not sep or kind not in ("fixed", "uniform", "lognormal"):
        raise WorkloadError(
            f"--workload {spec!r}: unknown kind {kind!r}; write {WORKLOAD_EXAMPLES}"
        )
    keys = _key_values(spec, rest)
    if kind == "fixed":
        _expect(spec, keys, required=("in", "out"))
        return SyntheticWorkload(
            spec, Fixed(_count(spec, keys, "in")), Fixed(_count(spec, keys, "out"))
        )
    if kind == "uniform":
        _expect(spec, keys, required=("in", "out"))
        return SyntheticWorkload(spec, _range(spec, keys, "in"), _range(spec, keys, "out"))
    _expect(spec, keys, required=("in_mean", "out_mean"), optional=("in_sigma", "out_sigma"))
    return SyntheticWorkload(spec, _lognormal(spec, keys, "in"), _lognormal(spec, keys, "out"))


def _parse_chat(spec: str, rest: str) -> SyntheticWorkload:
    """chat[:KEYS]: text prompts; lengths as fixed/uniform (in=, out=) or log-normal (default)."""
    keys = _key_values(spec, rest) if rest.strip() else {}
    if "in" in keys or "out" in keys:
        _expect(spec, keys, required=("in", "out"))
        return SyntheticWorkload(
            spec, _range(spec, keys, "in"), _range(spec, keys, "out"), text=True
        )
    _expect(spec, keys, required=(), optional=("in_mean", "out_mean", "in_sigma", "out_sigma"))
    in_mean, out_mean = CHAT_MEANS
    return SyntheticWorkload(
        spec,
        _lognormal(spec, keys, "in", in_mean),
        _lognormal(spec, keys, "out", out_mean),
        text=True,
    )


def _lognormal(spec: str, keys: dict[str, str], side: str, mean: float | None = None) -> LogNormal:
    """`side`_mean (required unless `mean` is given) and `side`_sigma (default 0.5)."""
    return LogNormal(
        _positive(spec, keys, f"{side}_mean", mean), _positive(spec, keys, f"{side}_sigma", 0.5)
    )


def _parse_trace(spec: str, rest: str) -> TraceWorkload:
    path_text, _, options = rest.partition(",")
    if not path_text.strip():
        raise WorkloadError(f"--workload {spec!r}: give the trace's path, e.g. trace:trace.csv")
    keys = _key_values(spec, options) if options else {}
    _expect(spec, keys, required=(), optional=("speedup", "timestamps", "scale"))
    replay = keys.get("timestamps", "true").lower()
    if replay not in ("true", "false"):
        raise WorkloadError(f"--workload {spec!r}: timestamps must be true or false")
    if replay == "false" and "speedup" in keys:
        raise WorkloadError(
            f"--workload {spec!r}: speedup only applies when replaying timestamps; "
            "drop speedup= or timestamps=false"
        )
    speedup = _positive(spec, keys, "speedup", 1.0) if replay == "true" else None
    scale = _positive(spec, keys, "scale", 1.0)
    path = Path(path_text.strip()).expanduser()
    return TraceWorkload(spec, path, load_trace(path), speedup, scale)


def _key_values(spec: str, text: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise WorkloadError(
                f"--workload {spec!r}: {item!r} is not KEY=VALUE; write e.g. {WORKLOAD_EXAMPLES}"
            )
        keys[key.strip().lower()] = value.strip()
    return keys


def _expect(
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


def _count(spec: str, keys: dict[str, str], key: str) -> int:
    value = keys[key]
    if not value.isdigit() or int(value) < 1:
        raise WorkloadError(f"--workload {spec!r}: {key}={value} must be a whole number >= 1")
    return int(value)


def _range(spec: str, keys: dict[str, str], key: str) -> Uniform:
    lo_text, _, hi_text = keys[key].partition("-")
    lo = _count(spec, {key: lo_text}, key)
    hi = _count(spec, {key: hi_text or lo_text}, key)
    if hi < lo:
        raise WorkloadError(f"--workload {spec!r}: {key}={keys[key]} must be LOW-HIGH, LOW <= HIGH")
    return Uniform(lo, hi)


def _positive(spec: str, keys: dict[str, str], key: str, default: float | None = None) -> float:
    if key not in keys and default is not None:
        return default
    try:
        value = float(keys[key])
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise WorkloadError(f"--workload {spec!r}: {key}={keys[key]} must be a number > 0")
    return value


def clip_to_context(
    shapes: Sequence[RequestShape], max_model_len: int | None
) -> list[RequestShape]:
    """Lengths >= 1; with a context, cut the prompt to leave one token, then the output."""
    if max_model_len is not None and max_model_len < 2:
        raise WorkloadError(f"model context {max_model_len} is too short to benchmark (need >= 2)")
    out = []
    for s in shapes:
        inp, gen = max(1, s.input_len), max(1, s.output_len)
        if max_model_len is not None:
            inp = min(inp, max_model_len - 1)
            gen = min(gen, max_model_len - inp)
        out.append(RequestShape(inp, gen))
    return out
