"""Latency breakdown of a benchmark run from a deployment's `/metrics`, scraped before and after.

The server observes each finished request's phases in histograms; the difference of their
`_sum`s and `_count`s between two scrapes covers exactly the requests finished in between:

    before = PhaseTotals.parse(text_before); after = PhaseTotals.parse(text_after)
    after.minus(before).breakdown_ms()   # mean ms per finished request

Breakdown keys: queue (router admission + prefill queue), prefill (compute incl. sending the
KV), transfer (KV landing on decode; it overlaps prefill compute, as layers are sent as soon as
they exist), decode (E2E - TTFT), and besides those ttft, e2e and ttft_other: the part of TTFT
outside queue + prefill (reservation, dispatch, hops). Colocated instances do not time queue and
prefill separately, so there TTFT is all ttft_other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

PHASE_HISTOGRAMS = {
    "queue": "pdserve:request_queue_time_seconds",
    "prefill": "pdserve:request_prefill_time_seconds",
    "transfer": "pdserve:kv_transfer_time_seconds",
    "ttft": "pdserve:time_to_first_token_seconds",
    "e2e": "pdserve:e2e_request_latency_seconds",
}
BREAKDOWN_KEYS = ("queue", "prefill", "transfer", "decode")


@dataclass(frozen=True)
class PhaseTotals:
    """Summed seconds and observation counts of each phase histogram (all label sets added)."""

    sums: Mapping[str, float]  # phase -> seconds
    counts: Mapping[str, float]  # phase -> observations

    @classmethod
    def parse(cls, text: str) -> PhaseTotals:
        """From Prometheus text; a histogram the server does not export counts as zero."""
        by_family = {family: phase for phase, family in PHASE_HISTOGRAMS.items()}
        sums = dict.fromkeys(PHASE_HISTOGRAMS, 0.0)
        counts = dict.fromkeys(PHASE_HISTOGRAMS, 0.0)
        for family in text_string_to_metric_families(text):
            phase = by_family.get(family.name)
            if phase is None:
                continue
            for sample in family.samples:
                if sample.name == family.name + "_sum":
                    sums[phase] += sample.value
                elif sample.name == family.name + "_count":
                    counts[phase] += sample.value
        return cls(sums, counts)

    def minus(self, before: PhaseTotals) -> PhaseTotals:
        """What was observed since `before` was scraped."""
        return PhaseTotals(
            {k: v - before.sums.get(k, 0.0) for k, v in self.sums.items()},
            {k: v - before.counts.get(k, 0.0) for k, v in self.counts.items()},
        )

    @property
    def finished(self) -> int:
        """Requests finished (each observes e2e once)."""
        return round(self.counts.get("e2e", 0.0))

    def breakdown_ms(self) -> dict[str, float]:
        """Mean milliseconds per finished request; all zero when none finished."""
        n = self.finished
        if n <= 0:
            return dict.fromkeys((*BREAKDOWN_KEYS, "ttft", "e2e", "ttft_other"), 0.0)
        mean = {k: self.sums.get(k, 0.0) / n * 1e3 for k in PHASE_HISTOGRAMS}
        return {
            "queue": mean["queue"],
            "prefill": mean["prefill"],
            # per finished request: requests whose KV never moved (colocated) add zero
            "transfer": mean["transfer"],
            "decode": max(0.0, mean["e2e"] - mean["ttft"]),
            "ttft": mean["ttft"],
            "e2e": mean["e2e"],
            "ttft_other": max(0.0, mean["ttft"] - mean["queue"] - mean["prefill"]),
        }
