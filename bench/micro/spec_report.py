"""The speculative-decoding benchmark's results: one (workload, batch, temperature, method)
measured without and with speculation (`Figure`), the table they are shown as, and the verdicts
on the issue's two targets."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.engine.speculative import SpecCounters

TARGET_REPEAT_B1 = 1.5  # decode tokens/s with speculation >= 1.5x without, repeat, B = 1
TARGET_CHAT_B16 = 0.9  # and >= 0.9x (no more than 10% slower) on chat at B = 16


@dataclass
class Figure:
    """One (workload, batch, temperature, method): runs without and with speculation."""

    workload: str
    batch: int
    temperature: float
    method: str
    off_s: list[float] = field(default_factory=list)
    on_s: list[float] = field(default_factory=list)
    tokens: int = 0  # tokens generated in the timed window (the same both ways)
    spec: SpecCounters = field(default_factory=SpecCounters)  # the last timed run's
    same_outputs: bool = True

    @property
    def speedup(self) -> float:
        return statistics.median(self.off_s) / statistics.median(self.on_s)

    def rate(self, seconds: list[float]) -> float:
        return self.tokens / statistics.median(seconds)

    def tpot_ms(self, seconds: list[float]) -> float:
        """Seconds per token of one sequence (batch 1: the prompts ran one at a time)."""
        return 1e3 * statistics.median(seconds) * self.batch / self.tokens


def format_table(figures: Sequence[Figure]) -> str:
    head = (
        f"{'workload':<8} {'B':>3} {'temp':>4} {'method':<6} {'off tok/s':>9} {'on tok/s':>9} "
        f"{'speed-up':>8} {'TPOT off':>8} {'TPOT on':>8} {'accept':>6} {'len':>5} same"
    )
    lines = [head, "-" * len(head)]
    for f in figures:
        lines.append(
            f"{f.workload:<8} {f.batch:>3} {f.temperature:>4.1f} {f.method:<6} "
            f"{f.rate(f.off_s):>9.1f} {f.rate(f.on_s):>9.1f} {f.speedup:>7.2f}x "
            f"{f.tpot_ms(f.off_s):>6.1f}ms {f.tpot_ms(f.on_s):>6.1f}ms "
            f"{100 * f.spec.acceptance_rate:>5.0f}% {max(f.spec.mean_accepted_length, 1.0):>5.2f} "
            f"{'yes' if f.same_outputs else 'no'}"
        )
    return "\n".join(lines)


def targets(figures: Sequence[Figure]) -> list[str]:
    """The issue's two targets, where this run measured them."""
    out = []
    for f in figures:
        if f.workload == "repeat" and f.batch == 1:
            verdict = "met" if f.speedup >= TARGET_REPEAT_B1 else "NOT met"
            out.append(
                f"repeat B=1 temp {f.temperature} {f.method}: {f.speedup:.2f}x "
                f">= {TARGET_REPEAT_B1}x: {verdict}"
            )
        if f.workload == "chat" and f.batch == 16:
            verdict = "met" if f.speedup >= TARGET_CHAT_B16 else "NOT met"
            out.append(
                f"chat B=16 temp {f.temperature} {f.method}: {f.speedup:.2f}x "
                f">= {TARGET_CHAT_B16}x: {verdict}"
            )
    return out
