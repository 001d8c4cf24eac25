"""Per-request records and the phase breakdown of a simulated run, in the bench's terms."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pdserve.bench.plan.sim_instances import SimRequest
from pdserve.bench.serve.metrics import RequestRecord


def sim_record(r: SimRequest) -> RequestRecord:
    rec = RequestRecord(r.index, r.input_len, r.output_len, r.arrival_s, r.arrival_s)
    if r.error or r.first_token_s is None or r.done_s is None:
        rec.error = r.error or "no first token"
        return rec
    rec.success = True
    rec.ttft_s = r.first_token_s - r.arrival_s
    rec.e2el_s = r.done_s - r.arrival_s
    rec.output_tokens = r.output_len
    return rec


def breakdown(requests: Sequence[SimRequest]) -> dict[str, float]:
    """Mean ms per phase, as the sweep reports it: queue (arrival -> prefill start), prefill,
    transfer (prefill end -> KV landed), decode (landed -> last token)."""
    ok = [r for r in requests if r.done_s is not None and r.landed_s is not None]
    if not ok:
        return {"queue": 0.0, "prefill": 0.0, "transfer": 0.0, "decode": 0.0}

    def mean(f: Callable[[SimRequest], float]) -> float:
        return float(np.mean([f(r) for r in ok])) * 1e3

    return {
        "queue": mean(lambda r: (r.prefill_start_s or 0.0) - r.arrival_s),
        "prefill": mean(lambda r: (r.prefill_end_s or 0.0) - (r.prefill_start_s or 0.0)),
        "transfer": mean(lambda r: (r.landed_s or 0.0) - (r.prefill_end_s or 0.0)),
        "decode": mean(lambda r: (r.done_s or 0.0) - (r.landed_s or 0.0)),
    }
