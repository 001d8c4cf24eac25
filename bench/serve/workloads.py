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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdserve.bench.serve.arrivals import replay_times
from pdserve.bench.serve.reuse_workloads import (
    REUSE_HELP,
    MultiTurnWorkload,
    SharedPrefixWorkload,
    context_problem,
    parse_multi_turn,
    parse_shared_prefix,
)
from pdserve.bench.serve.traces import TraceRow, load_trace
from pdserve.bench.serve.workload_spec import (
    WORKLOAD_EXAMPLES,
    Fixed,
    LengthDist,
    LogNormal,
    RequestShape,
    Uniform,
    WorkloadError,
    count,
    expect,
    key_values,
    length_range,
    positive,
)

WORKLOAD_HELP = (
    """\
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
"""
    + REUSE_HELP
    + """
Token ids on /v1/completions; text on /v1/chat/completions (every workload) and for chat,
shared-prefix and multi-turn. Lengths are clipped to the model's context (from /v1/models or
--max-model-len); a shared-prefix or multi-turn request that does not fit is an error."""
)
__all__ = [
    "WORKLOAD_EXAMPLES",
    "WORKLOAD_HELP",
    "Fixed",
    "LogNormal",
    "RequestShape",
    "SyntheticWorkload",
    "TraceWorkload",
    "Uniform",
    "Workload",
    "WorkloadError",
    "clip_to_context",
    "parse_workload",
    "scaled_length",
]
SCALE_FLOOR = 16  # tokens: a trace's scale= never takes a length below min(length, this)
CHAT_MEANS = (256.0, 128.0)  # `chat` without lengths: log-normal input and output means


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


Workload = SyntheticWorkload | TraceWorkload | SharedPrefixWorkload | MultiTurnWorkload


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
    if kind == "shared-prefix":
        return parse_shared_prefix(spec, rest)
    if kind == "multi-turn":
        return parse_multi_turn(spec, rest)
    if not sep or kind not in ("fixed", "uniform", "lognormal"):
        raise WorkloadError(
            f"--workload {spec!r}: unknown kind {kind!r}; write {WORKLOAD_EXAMPLES}"
        )
    keys = key_values(spec, rest)
    if kind == "fixed":
        expect(spec, keys, required=("in", "out"))
        return SyntheticWorkload(
            spec, Fixed(count(spec, keys, "in")), Fixed(count(spec, keys, "out"))
        )
    if kind == "uniform":
        expect(spec, keys, required=("in", "out"))
        return SyntheticWorkload(
            spec, length_range(spec, keys, "in"), length_range(spec, keys, "out")
        )
    expect(spec, keys, required=("in_mean", "out_mean"), optional=("in_sigma", "out_sigma"))
    return SyntheticWorkload(spec, _lognormal(spec, keys, "in"), _lognormal(spec, keys, "out"))


def _parse_chat(spec: str, rest: str) -> SyntheticWorkload:
    """chat[:KEYS]: text prompts; lengths as fixed/uniform (in=, out=) or log-normal (default)."""
    keys = key_values(spec, rest) if rest.strip() else {}
    if "in" in keys or "out" in keys:
        expect(spec, keys, required=("in", "out"))
        return SyntheticWorkload(
            spec, length_range(spec, keys, "in"), length_range(spec, keys, "out"), text=True
        )
    expect(spec, keys, required=(), optional=("in_mean", "out_mean", "in_sigma", "out_sigma"))
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
        positive(spec, keys, f"{side}_mean", mean), positive(spec, keys, f"{side}_sigma", 0.5)
    )


def _parse_trace(spec: str, rest: str) -> TraceWorkload:
    path_text, _, options = rest.partition(",")
    if not path_text.strip():
        raise WorkloadError(f"--workload {spec!r}: give the trace's path, e.g. trace:trace.csv")
    keys = key_values(spec, options) if options else {}
    expect(spec, keys, required=(), optional=("speedup", "timestamps", "scale"))
    replay = keys.get("timestamps", "true").lower()
    if replay not in ("true", "false"):
        raise WorkloadError(f"--workload {spec!r}: timestamps must be true or false")
    if replay == "false" and "speedup" in keys:
        raise WorkloadError(
            f"--workload {spec!r}: speedup only applies when replaying timestamps; "
            "drop speedup= or timestamps=false"
        )
    speedup = positive(spec, keys, "speedup", 1.0) if replay == "true" else None
    scale = positive(spec, keys, "scale", 1.0)
    path = Path(path_text.strip()).expanduser()
    return TraceWorkload(spec, path, load_trace(path), speedup, scale)


def clip_to_context(
    shapes: Sequence[RequestShape], max_model_len: int | None
) -> list[RequestShape]:
    """Lengths >= 1; with a context, cut the prompt to leave one token, then the output. Shapes
    that share prefixes are kept whole (a cut would change what they share): WorkloadError
    when one does not fit."""
    if max_model_len is not None and max_model_len < 2:
        raise WorkloadError(f"model context {max_model_len} is too short to benchmark (need >= 2)")
    if any(s.reuses for s in shapes):
        problem = None if max_model_len is None else context_problem(list(shapes), max_model_len)
        if problem is not None:
            raise WorkloadError(problem)
        return list(shapes)
    out = []
    for s in shapes:
        inp, gen = max(1, s.input_len), max(1, s.output_len)
        if max_model_len is not None:
            inp = min(inp, max_model_len - 1)
            gen = min(gen, max_model_len - inp)
        out.append(RequestShape(inp, gen))
    return out
