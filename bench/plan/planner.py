"""Ranking placements by simulated goodput per device, the core of `pdserve plan`.

For every placement that fits (colocated x1..N; disaggregated with prefill TP 1, 2, 4, ...,
any prefill and decode counts), bisect the highest request rate whose simulated SLO attainment
meets the target (`sweep.bisection`, the sweep's own search) and rank the placements. The
command's flags and printing are `plan.cli`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pdserve.bench.plan.placement import Placement, profile_config
from pdserve.bench.plan.profile_model import Profile
from pdserve.bench.plan.simulator import HostCpu, plan_shapes, simulate
from pdserve.bench.serve.workloads import RequestShape, Workload
from pdserve.bench.sweep.bisection import BisectionResult, bisect_rate
from pdserve.cluster.config.resolve import settle
from pdserve.engine.deploy_config import PrefillSettings


@dataclass(frozen=True)
class Ranked:
    placement: Placement
    search: BisectionResult | None  # None: the placement cannot run (error says why)
    error: str = ""

    @property
    def goodput(self) -> float:
        return self.search.best_rate if self.search else 0.0

    @property
    def per_device(self) -> float:
        return self.goodput / self.placement.devices


@dataclass(frozen=True)
class SearchSettings:
    workload: Workload
    slos_ms: Mapping[str, float]
    target: float = 0.9
    num_prompts: int = 300
    seed: int = 0
    burstiness: float = 1.0
    rate_range: tuple[float, float] | None = None  # None: from the profile (rate_range_for)
    rel_tol: float = 0.05
    max_probes: int = 12
    host: HostCpu | None = None  # None: the profiled host (CPU) or a device each (GPU)
    prefix_caching: bool | None = None  # None: as the profile's spec says (on by default)
    prefill_cache_blocks: int | None = None  # each prefill instance's; None: prefill.kv_cache


def rate_range_for(profile: Profile, workload: Workload, devices: int) -> tuple[float, float]:
    """A range sure to hold the answer: above it, even `devices` prefill instances batching
    full token budgets could not prefill the prompts fast enough."""
    shapes = workload.sample(256, seed=0)
    fresh = [fresh_tokens(s, shapes) for s in shapes]  # all a prefill may have to compute
    mean_in = max(1, round(sum(fresh) / len(fresh)))
    pool = profile_config(profile).prefill or PrefillSettings()
    per_batch = max(1, min(pool.max_batch_tokens // mean_in, pool.max_batch_size))
    batch_s = profile.prefill_ms([mean_in] * per_batch) / 1e3
    hi = 1.5 * devices * per_batch / max(batch_s, 1e-6)
    return hi / 1000, hi


def fresh_tokens(shape: RequestShape, shapes: Sequence[RequestShape]) -> int:
    """The prompt tokens no cache can hold: past the group's prefix, or past the turn before."""
    if shape.follows is not None:
        return max(1, shape.input_len - shapes[shape.follows].input_len)
    return max(1, shape.input_len - shape.shared_len)


def rank(
    placements: Sequence[Placement],
    evaluate: Callable[[Placement], Ranked],
    progress: Callable[[Placement], None] = lambda p: None,
) -> list[Ranked]:
    """Evaluate each placement; best goodput per device first, then more goodput, fewer devices."""
    out = []
    for p in placements:
        progress(p)
        out.append(evaluate(p))
    return sorted(out, key=lambda r: (-r.per_device, -r.goodput, r.placement.devices))


def search_placement(
    profile: Profile, placement: Placement, spec: Mapping[str, Any], s: SearchSettings
) -> Ranked:
    """Bisect one placement's goodput with the simulator, running the settings its spec gives."""
    from pdserve.cluster.config.spec import SpecError, load_spec

    if s.prefix_caching is not None:
        spec = {**spec, "prefix_caching": s.prefix_caching}
    try:
        config = settle(load_spec(spec), profile.device)
    except SpecError as e:
        return Ranked(placement, None, str(e))
    lo, hi = s.rate_range or rate_range_for(profile, s.workload, placement.devices)
    max_len = profile.model.max_model_len

    def attainment(rate: float) -> float:
        planned = plan_shapes(s.workload, s.num_prompts, rate, s.burstiness, s.seed, max_len)
        sim = simulate(
            profile, placement, planned, s.slos_ms, config, s.host, s.prefill_cache_blocks
        )
        return sim.attainment

    try:
        found = bisect_rate(
            attainment, lo, hi, s.target, rel_tol=s.rel_tol, max_probes=s.max_probes
        )
    except ValueError as e:  # e.g. a KV cache smaller than the model's context
        return Ranked(placement, None, str(e))
    return Ranked(placement, found)


def format_ranking(ranked: Sequence[Ranked], top: int) -> str:
    head = ("#", "placement", "devices", "goodput req/s", "per device", "probes", "note")
    rows = []
    for i, r in enumerate(ranked[:top], 1):
        note = r.error[:60] if r.error else ""
        if r.search is not None and r.search.saturated:
            note = "met the target at the top of the range: a lower bound"
        rows.append((
            str(i), r.placement.name, str(r.placement.devices), f"{r.goodput:.3f}",
            f"{r.per_device:.3f}", str(len(r.search.probes) if r.search else 0), note,
        ))  # fmt: skip
    return _table(head, rows)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *rows)]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
