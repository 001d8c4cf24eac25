"""Per-request records -> the benchmark summary, in `vllm bench serve`'s terms and JSON keys.

Definitions (client side, seconds inside, milliseconds in the summary):

- TTFT: request sent -> first streamed chunk that carried tokens.
- E2EL: request sent -> stream finished.
- TPOT: (E2EL - TTFT) / (output tokens - 1). The latency statistics leave 1-token outputs out
  (their TPOT is undefined); for SLO checks a 1-token output counts as TPOT 0, as vLLM does.
- ITL: gaps between consecutive streamed chunks that carried tokens, pooled over requests.
- Goodput: requests meeting every given SLO / benchmark duration.
- SLO attainment: requests meeting every given SLO / requests sent. A failed request meets
  none: an overloaded server that answers 429 loses attainment, it does not shed it.

Failed requests count in `failed` and in attainment's denominator, nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


class GoodputSpecError(ValueError):
    """A --goodput argument that is not `NAME:MILLISECONDS` with a known SLO name."""


@dataclass
class RequestRecord:
    """What the client saw of one request; times in seconds from the benchmark's start."""

    index: int
    input_len: int  # prompt tokens sent (the server's usage count when it gives one)
    output_len: int  # tokens asked for (max_tokens with ignore_eos)
    arrival_s: float  # when the arrival process scheduled it
    start_s: float = 0.0  # when it was sent (later than arrival_s under --max-concurrency)
    success: bool = False
    ttft_s: float = 0.0
    e2el_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0  # tokens generated (usage.completion_tokens)
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if reported
    error: str = ""

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first; 0 for a 1-token output."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    def slo_values_ms(self) -> dict[str, float]:
        return {"ttft": self.ttft_s * 1e3, "tpot": self.tpot_s * 1e3, "e2el": self.e2el_s * 1e3}

    def meets(self, slos_ms: Mapping[str, float]) -> dict[str, bool]:
        """SLO name -> met; a failed request meets none."""
        values = self.slo_values_ms()
        return {name: self.success and values[name] <= limit for name, limit in slos_ms.items()}

    def to_json(self, slos_ms: Mapping[str, float]) -> dict[str, Any]:
        """One JSONL line of --save-records."""
        return {
            "index": self.index,
            "success": self.success,
            "error": self.error,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "arrival_s": self.arrival_s,
            "start_s": self.start_s,
            "ttft_ms": self.ttft_s * 1e3,
            "tpot_ms": self.tpot_s * 1e3,
            "e2el_ms": self.e2el_s * 1e3,
            "itl_ms": [x * 1e3 for x in self.itl_s],
            "slo_met": self.meets(slos_ms),
        }


def parse_goodput(pairs: Sequence[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise GoodputSpecError(
                f"--goodput {pair!r}: write NAME:MILLISECONDS with NAME one of "
                f"{', '.join(SLO_METRICS)}, e.g. --goodput ttft:500 tpot:50"
            )
        try:
            limit = float(value)
        except ValueError:
            raise GoodputSpecError(
                f"--goodput {pair!r}: {value!r} is not a number of milliseconds"
            ) from None
        if not limit >= 0 or math.isinf(limit):
            raise GoodputSpecError(f"--goodput {pair!r}: the SLO must be a finite value >= 0 ms")
        slos[name] = limit
    return slos


@dataclass(frozen=True)
class MetricStats:
    """Mean, median, std and chosen percentiles of one latency metric, in milliseconds."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: tuple[tuple[float, float], ...]  # (percentile, value)

    @classmethod
    def of(cls, values_s: Sequence[float], percentiles: Sequence[float]) -> MetricStats:
        # empty (nothing succeeded): zeros, as vLLM reports
        arr = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1e3
        return cls(
            mean_ms=float(np.mean(arr)),
            median_ms=float(np.median(arr)),
            std_ms=float(np.std(arr)),
            percentiles_ms=tuple((float(p), float(np.percentile(arr, p))) for p in percentiles),
        )


@dataclass(frozen=True)
class BenchSummary:
    """The numbers of one benchmark run (vLLM's BenchmarkMetrics plus SLO attainment)."""

    completed: int
    failed: int
    duration_s: float
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float | None  # None without SLOs
    output_throughput: float
    total_token_throughput: float
    latency: Mapping[str, MetricStats]  # "ttft" | "tpot" | "itl" | "e2el"
    slos_ms: Mapping[str, float]
    slo_attainment: float | None  # share of requests sent meeting every SLO; None without SLOs
    slo_attainment_by_metric: Mapping[str, float]  # one SLO at a time

    def to_json(self, metrics: Sequence[str] = LATENCY_METRICS) -> dict[str, Any]:
        """vLLM's result keys (duration, completed, ..., p99_ttft_ms) plus slo_attainment*."""
        out: dict[str, Any] = {
            "duration": self.duration_s,
            "completed": self.completed,
            "failed": self.failed,
            "total_input_tokens": self.total_input,
            "total_output_tokens": self.total_output,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
        }
        for name in metrics:
            stats = self.latency[name]
            out[f"mean_{name}_ms"] = stats.mean_ms
            out[f"median_{name}_ms"] = stats.median_ms
            out[f"std_{name}_ms"] = stats.std_ms
            for p, value in stats.percentiles_ms:
                out[f"p{percentile_word(p)}_{name}_ms"] = value
        out["goodput_slos_ms"] = dict(self.slos_ms)
        out["slo_attainment"] = self.slo_attainment
        for name, share in self.slo_attainment_by_metric.items():
            out[f"slo_attainment_{name}"] = share
        return out


def percentile_word(p: float) -> str:
    """99.0 -> "99", 99.9 -> "99.9" (vLLM's key spelling)."""
    return str(int(p)) if int(p) == p else str(p)


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slos_ms: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = (99.0,),
) -> BenchSummary:
    """Aggregate per-request records over a run that lasted `duration_s` seconds."""
    if duration_s <= 0:
        raise ValueError(f"benchmark duration must be > 0 s, got {duration_s}")
    slos = dict(slos_ms or {})
    ok = [r for r in records if r.success]
    total_in = sum(r.input_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    latency = {
        "ttft": MetricStats.of([r.ttft_s for r in ok], percentiles),
        "tpot": MetricStats.of([r.tpot_s for r in ok if r.output_tokens > 1], percentiles),
        "itl": MetricStats.of([gap for r in ok for gap in r.itl_s], percentiles),
        "e2el": MetricStats.of([r.e2el_s for r in ok], percentiles),
    }
    met = [r.meets(slos) for r in records]
    good = sum(all(m.values()) for m in met) if slos else 0
    sent = max(len(records), 1)
    return BenchSummary(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input=total_in,
        total_output=total_out,
        request_throughput=len(ok) / duration_s,
        request_goodput=good / duration_s if slos else None,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        latency=latency,
        slos_ms=slos,
        slo_attainment=good / sent if slos else None,
        slo_attainment_by_metric={n: sum(m[n] for m in met) / sent for n in slos},
    )


def format_result(
    summary: BenchSummary,
    request_rate: float,
    max_concurrency: int | None,
    metrics: Sequence[str] = LATENCY_METRICS,
) -> str:
    """The printed result block, line for line as `vllm bench serve`, plus SLO attainment."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: float | int, fmt: str = "<10.2f") -> None:
        lines.append(f"{label:<40} {value:{fmt}}")

    row("Successful requests:", summary.completed, "<10")
    row("Failed requests:", summary.failed, "<10")
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency, "<10")
    if not math.isinf(request_rate):
        row("Request rate configured (RPS):", request_rate)
    row("Benchmark duration (s):", summary.duration_s)
    row("Total input tokens:", summary.total_input, "<10")
    row("Total generated tokens:", summary.total_output, "<10")
    row("Request throughput (req/s):", summary.request_throughput)
    if summary.request_goodput is not None and summary.slo_attainment is not None:
        row("Request goodput (req/s):", summary.request_goodput)
        row("SLO attainment (%):", 100 * summary.slo_attainment)
        for name, share in summary.slo_attainment_by_metric.items():
            slo = f"{METRIC_TITLES[name][0]} <= {summary.slos_ms[name]:g} ms"
            row(f"  {slo} (%):", 100 * share)
    row("Output token throughput (tok/s):", summary.output_throughput)
    row("Total Token throughput (tok/s):", summary.total_token_throughput)
    for name in metrics:
        short, header = METRIC_TITLES[name]
        stats = summary.latency[name]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", stats.mean_ms)
        row(f"Median {short} (ms):", stats.median_ms)
        for p, value in stats.percentiles_ms:
            row(f"P{percentile_word(p)} {short} (ms):", value)
    lines.append("=" * 50)
    return "\n".join(lines)
