"""One probe of a sweep: a benchmark run at one rate against a live deployment.

Around the run, `/metrics` is scraped for the latency breakdown (bench.sweep.phase_metrics) and the
server is left idle before the next probe. The run is cut at a deadline after which every
unfinished request has certainly missed its SLOs, so an overloaded rate costs seconds, not
minutes, and its attainment is what an unbounded run would have measured.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from pdserve.bench.serve.load import PlannedRequest
from pdserve.bench.serve.metrics import BenchSummary
from pdserve.bench.serve.runner import BenchConfig, discover_model, plan_requests, run_benchmark
from pdserve.bench.serve.workloads import Workload
from pdserve.bench.sweep.experiment import SweepWorkload
from pdserve.bench.sweep.phase_metrics import PhaseTotals
from pdserve.bench.sweep.results import ProbeResult

logger = logging.getLogger(__name__)

DEADLINE_SLACK_S = 2.0  # on top of the SLO bound: send jitter and the last chunk's way back
IDLE_TIMEOUT_S = 60.0  # cancelled requests are aborted server-side; wait at most this for it
IDLE_POLL_S = 0.1


@dataclass(frozen=True)
class Server:
    """A deployment to probe: its root URL, served model and context length."""

    url: str
    model: str
    max_model_len: int | None
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @classmethod
    async def discover(cls, url: str, api_key: str | None) -> Server:
        model, max_len = await discover_model(BenchConfig(base_url=url, api_key=api_key))
        return cls(url, model, max_len, api_key)


def probe_deadline(planned: Sequence[PlannedRequest], slos_ms: Mapping[str, float]) -> float | None:
    """Seconds from the start after which each unfinished request has missed an SLO: one that
    met TTFT and TPOT finished within TTFT + TPOT x (output - 1) of being sent. A later turn of
    a conversation is sent when the turn it follows ends, so its bound adds to that turn's.
    None when the SLOs bound no request's end (TTFT alone)."""
    ttft, tpot, e2el = (slos_ms.get(k) for k in ("ttft", "tpot", "e2el"))
    if e2el is None and (ttft is None or tpot is None):
        return None
    ends: dict[int, float] = {}
    latest = 0.0
    for req in planned:  # a turn comes after the one it follows
        bound_ms = math.inf if e2el is None else e2el
        if ttft is not None and tpot is not None:
            bound_ms = min(bound_ms, ttft + tpot * max(0, req.output_len - 1))
        start = req.arrival_s if req.follows is None else ends[req.follows]
        ends[req.index] = start + bound_ms / 1e3
        latest = max(latest, ends[req.index])
    return latest + DEADLINE_SLACK_S


def bench_config(
    server: Server, workload: Workload, w: SweepWorkload, rate: float, seed: int, n: int
) -> BenchConfig:
    """The same seed at every rate: the same prompts and lengths, arrivals only rescaled."""
    return BenchConfig(
        base_url=server.url,
        workload=workload,
        model=server.model,
        max_model_len=server.max_model_len,
        api_key=server.api_key,
        request_rate=rate,
        burstiness=w.burstiness,
        num_prompts=n,
        goodput_ms=dict(w.slos_ms),
        seed=seed,
        show_progress=False,
    )


async def warm_up(server: Server, workload: Workload, w: SweepWorkload, n: int, seed: int) -> None:
    """n unmeasured requests of the workload, all at once (loads caches, opens KV links)."""
    if n > 0:
        config = bench_config(server, workload, w, math.inf, seed, n)
        await run_benchmark(config)


async def run_probe(
    server: Server,
    workload: Workload,
    w: SweepWorkload,
    rate: float,
    *,
    devices: int,
    seed: int,
    records_path: Path,
) -> ProbeResult:
    """Run the workload at `rate` req/s; per-request records go to `records_path` (JSONL)."""
    config = bench_config(server, workload, w, rate, seed, w.num_requests(rate))
    deadline = probe_deadline(plan_requests(config, workload), w.slos_ms)
    async with httpx.AsyncClient(timeout=30.0, headers=server.headers) as client:
        before = await scrape_phases(client, server.url)
        result = await run_benchmark(replace(config, max_duration_s=deadline))
        await wait_idle(client, server.url)
        after = await scrape_phases(client, server.url)
    result.save(None, records_path)
    phases = after.minus(before)
    out = probe_result(result.summary, rate, devices, phases.breakdown_ms())
    extra = {**out.extra, "records": records_path.name, "deadline_s": deadline}
    return replace(out, extra=extra | {"server_finished": phases.finished})


def probe_result(
    summary: BenchSummary, rate: float, devices: int, breakdown_ms: Mapping[str, float]
) -> ProbeResult:
    """A probe's entry in results.json from its benchmark summary."""
    assert summary.slo_attainment is not None, "a sweep always sets SLOs"
    by_metric = summary.slo_attainment_by_metric
    latency = {
        f"{stat}_{name}_ms": value
        for name in ("ttft", "tpot", "e2el")
        for stat, value in (
            ("mean", summary.latency[name].mean_ms),
            *((f"p{p:g}", v) for p, v in summary.latency[name].percentiles_ms),
        )
    }
    extra = {"goodput": summary.request_goodput, "throughput": summary.request_throughput}
    if "e2el" in by_metric:
        extra["e2el_attainment"] = by_metric["e2el"]
    return ProbeResult(
        rate=rate,
        rate_per_device=rate / devices,
        attainment=summary.slo_attainment,
        ttft_attainment=by_metric.get("ttft"),
        tpot_attainment=by_metric.get("tpot"),
        num_requests=summary.completed + summary.failed,
        failed=summary.failed,
        duration_s=summary.duration_s,
        breakdown_ms=dict(breakdown_ms),
        extra=extra | latency,
    )


async def scrape_phases(client: httpx.AsyncClient, url: str) -> PhaseTotals:
    resp = await client.get(url + "/metrics")
    resp.raise_for_status()
    return PhaseTotals.parse(resp.text)


async def wait_idle(client: httpx.AsyncClient, url: str) -> None:
    """Until the deployment has no request in flight (requests cut at the deadline are aborted
    on the server as their connections close), so the next probe starts on an idle server."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        resp = await client.get(url + "/status")
        resp.raise_for_status()
        if not resp.json().get("inflight"):
            return
        await asyncio.sleep(IDLE_POLL_S)
    logger.warning("%s still has requests in flight after %.0f s", url, IDLE_TIMEOUT_S)
