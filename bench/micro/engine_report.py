"""The engine benchmark's results: one engine's timings of one phase at one batch size
(`Series`), pdserve against a baseline (`Row`), and the table and JSON they are shown as."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


@dataclass
class Series:
    """One engine's repeated timings of one phase at one batch size."""

    phase: str
    batch: int
    engine: str
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    same_outputs: str | None = None  # "k/B" sequences identical to pdserve's (decode baselines)

    @property
    def rates(self) -> list[float]:
        return [n / s for n, s in zip(self.tokens, self.seconds, strict=True)]

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates)


@dataclass
class Row:
    """pdserve against one baseline on one phase and batch size."""

    phase: str
    batch: int
    ours: Series
    base: Series
    target: float | None = None
    label: str | None = None  # the baseline's name in the table, when not its engine's

    @property
    def baseline(self) -> str:
        return self.label or self.base.engine

    @property
    def ratio(self) -> float:
        return self.ours.median_rate / self.base.median_rate

    @property
    def best_ratio(self) -> float:
        return max(self.ours.rates) / max(self.base.rates)

    def verdict(self) -> str:
        if self.target is None:
            return ""
        return f">= {self.target:.2f}x: {'met' if self.ratio >= self.target else 'NOT met'}"


def format_table(rows: Sequence[Row]) -> str:
    head = (
        "phase",
        "B",
        "pdserve tok/s",
        "baseline",
        "tok/s",
        "ratio",
        "best",
        "same out",
        "target",
    )
    body = [
        (
            r.phase,
            str(r.batch),
            f"{r.ours.median_rate:,.0f}",
            r.baseline,
            f"{r.base.median_rate:,.0f}",
            f"{r.ratio:.2f}x",
            f"{r.best_ratio:.2f}x",
            r.base.same_outputs or "",
            r.verdict(),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (head, *body)
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def to_json(rows: Sequence[Row], facts: dict, args: argparse.Namespace) -> dict:
    return {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "facts": facts,
        "rows": [
            {
                "phase": r.phase,
                "batch": r.batch,
                "baseline": r.baseline,
                "pdserve_tok_s": r.ours.median_rate,
                "baseline_tok_s": r.base.median_rate,
                "ratio": r.ratio,
                "best_ratio": r.best_ratio,
                "target": r.target,
            }
            for r in rows
        ],
        "series": [asdict(s) | {"rates": s.rates} for s in _unique_series(rows)],
    }


def _unique_series(rows: Sequence[Row]) -> list[Series]:
    seen: dict[int, Series] = {}
    for r in rows:
        seen.setdefault(id(r.ours), r.ours)
        seen.setdefault(id(r.base), r.base)
    return list(seen.values())
