"""A hand-made profile with round numbers, so simulated latencies can be computed by hand.

prefill_ms(lens) = 10 + 0.1 * tokens; decode_ms(batch, ctx) = 5 + 1 * batch;
KV lands 2 ms after the prefill; dispatch 3 ms; return 1 ms; no per-step overhead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pdserve.bench.plan.latency_model import DECODE_FEATURES, PREFILL_FEATURES, Fit, TransferModel
from pdserve.bench.plan.profile_model import ModelShape, Overheads, Profile

SHAPE = ModelShape("toy", 8, 64, 128, 4, 2, 16, 4, 4096, 1000)


def fit(features: tuple[str, ...], **coef: float) -> Fit:
    return Fit(features, tuple(coef.get(f, 0.0) for f in features), 1.0, 0.0, 0.0, 10)


def toy_spec(**sections: Any) -> dict[str, Any]:
    """The toy deploy spec (1000 KV blocks of 16 tokens), its sections updated by ``sections``
    (a top-level value such as mode replaces; a section's keys merge into it)."""
    spec: dict[str, Any] = {
        "name": "toy", "model": {"device": "cpu"}, "decode": {"kv_cache": {"blocks": 1000}},
    }  # fmt: skip
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def make_profile(**changes: Any) -> Profile:
    base = Profile(
        model=SHAPE,
        prefill={1: fit(PREFILL_FEATURES, const=10.0, tokens=0.1)},
        decode=fit(DECODE_FEATURES, const=5.0, batch=1.0),
        transfer=TransferModel(latency_ms=2.0, bandwidth_gbps=1e9),
        overheads=Overheads(dispatch_ms=3.0, return_ms=1.0, step_ms=0.0, source="test"),
        spec=toy_spec(),
    )
    return replace(base, **changes)
