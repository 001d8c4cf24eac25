"""Discrete-event simulation of a placement serving a workload, in `pdserve bench`'s terms.

The requests are the bench's own: the same workload sampler, arrival process and seeds
(`plan_shapes` mirrors `bench.serve.runner.plan_requests`). Each request then goes the way
docs/architecture.md describes::

    arrival ─dispatch_ms─▶ admission (max_queued_requests, else failed: 429)
            ─▶ router: pick decode by policy, reserve the prompt's blocks (wait while all full)
            ─▶ disaggregated: pick prefill by policy ─▶ FIFO queue ─▶ take_batch ─▶ forward with
               KV sent layer by layer ─▶ first token (+return_ms = TTFT) ─▶ KV lands (+latency)
               colocated: local prefill queue, run before the next decode step (prefill priority)
            ─▶ decode: real DecodeScheduler, one step at a time ─▶ last token (+return_ms = E2E)

Per-request records go through `bench.serve.metrics.summarize`, so TTFT, TPOT (E2E - TTFT over
out - 1, 0 for one token) and attainment have the bench's definitions.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.bench.plan.cpu_share import CpuShare
from pdserve.bench.plan.placement import Placement, kv_blocks, profile_config
from pdserve.bench.plan.profile_model import Profile
from pdserve.bench.plan.sim_instances import MS, DecodeSim, PrefillSim, SimRequest
from pdserve.bench.serve.arrivals import arrival_times
from pdserve.bench.serve.metrics import BenchSummary, RequestRecord, summarize
from pdserve.bench.serve.workloads import RequestShape, TraceWorkload, Workload, clip_to_context
from pdserve.engine.deploy_config import DeploymentConfig
from pdserve.router.policies import pick_decode, pick_prefill

QUEUE_FULL = "HTTP 429: admission queue full (max_queued_requests)"
NO_CAPACITY = "no decode replica can hold this prompt's KV blocks"


@dataclass(frozen=True)
class PlannedShape:
    arrival_s: float
    shape: RequestShape


def plan_shapes(
    workload: Workload,
    num_prompts: int,
    rate: float,
    burstiness: float,
    seed: int,
    max_model_len: int | None,
) -> list[PlannedShape]:
    """Lengths and arrival times exactly as `bench.serve.runner.plan_requests` draws them."""
    length_seed, arrival_seed, _ = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
    shapes = clip_to_context(workload.sample(num_prompts, length_seed), max_model_len)
    if isinstance(workload, TraceWorkload) and workload.replays_timestamps:
        arrivals = workload.arrival_times(num_prompts)
    else:
        arrivals = arrival_times(num_prompts, rate, burstiness, arrival_seed)
    return [PlannedShape(t, s) for t, s in zip(arrivals, shapes)]


@dataclass(frozen=True)
class HostCpu:
    """The CPU host the workers share (`bench.plan.cpu_share`): None cores on GPUs (a device
    each); `background`: cores other load keeps busy (other tenants, the client, ...)."""

    cores: float | None = None
    background: float = 0.0
    # slowdown beside a worker computing on another core: one number, or per "kind|neighbour"
    corun: float | Mapping[str, float] = 0.0

    @classmethod
    def of(cls, profile: Profile, background: float = 0.0, cores: float | None = None) -> HostCpu:
        """The profiled machine's cores (and co-run slowdown) when the profile ran on CPU;
        `cores` overrides."""
        if profile.device != "cpu":
            return cls(None, 0.0)
        corun = profile.corun_pairs or profile.corun
        return cls(cores or profile.hardware.get("cpu_count"), background, corun)


@dataclass(frozen=True)
class SimResult:
    records: list[RequestRecord]
    summary: BenchSummary
    breakdown_ms: Mapping[str, float]  # mean queue / prefill / transfer / decode of successes

    @property
    def attainment(self) -> float:
        return self.summary.slo_attainment or 0.0

    def attainment_of(self, metric: str) -> float:
        """Attainment of one SLO alone (1.0 when that SLO was not given)."""
        return self.summary.slo_attainment_by_metric.get(metric, 1.0)


class Simulation:
    """One run: build the instances, feed the arrivals, drain the event queue."""

    def __init__(
        self,
        profile: Profile,
        placement: Placement,
        config: DeploymentConfig | None = None,
        host: HostCpu | None = None,
    ) -> None:
        self.profile = profile
        self.config = config or profile_config(profile)
        self.num_blocks = kv_blocks(self.config, profile)
        self.placement = placement
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        host = host or HostCpu.of(profile)
        self.cpu = CpuShare(lambda: self.now, self.at, host.cores, host.background, host.corun)
        self._stream_cpu = StreamCpu(self.cpu, profile.overheads.stream_cpu_ms)
        self.decodes = [DecodeSim(self, j) for j in range(placement.decode_instances)]
        self.prefills = [
            PrefillSim(self, i, placement.prefill_tp, self.decodes)
            for i in range(placement.prefill_instances)
        ]
        self.requests: list[SimRequest] = []
        self._inflight = 0
        self._waiting: deque[SimRequest] = deque()  # reserved nowhere yet: all replicas full
        self._turns = (itertools.count(), itertools.count())  # round robin: prefill, decode

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._order), fn))

    def busy_for(
        self, owner: object, ms: float, threads: int, done: Callable[[], None], kind: str
    ) -> None:
        self.cpu.run(owner, ms, threads, done, kind)

    def run(self, planned: Sequence[PlannedShape], slos_ms: Mapping[str, float]) -> SimResult:
        for i, p in enumerate(planned):
            req = SimRequest(i, p.arrival_s, p.shape.input_len, p.shape.output_len)
            self.requests.append(req)
            self.at(p.arrival_s, lambda r=req: self._arrive(r))  # type: ignore[misc]
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()
        for req in self.requests:  # nothing left to happen: whoever did not finish failed
            if req.done_s is None and not req.error:
                req.error = "never finished (simulation drained with the request in flight)"
        records = [_record(r) for r in self.requests]
        end = max((r.done_s or r.arrival_s for r in self.requests), default=0.0)
        summary = summarize(records, max(end, 1e-9), slos_ms)
        return SimResult(records, summary, _breakdown(self.requests))

    # -- the router ---------------------------------------------------------------------------

    def _arrive(self, req: SimRequest) -> None:
        if self._inflight >= self.config.router.max_queued_requests:
            req.error = QUEUE_FULL
            return
        self._inflight += 1
        dispatch = self.profile.overheads.dispatch_ms * MS
        self.at(self.now + dispatch, lambda: self._dispatch(req))

    def _dispatch(self, req: SimRequest) -> None:
        needed = -(-req.input_len // self.config.decode.block_size)
        if all(needed > d.blocks.num_blocks for d in self.decodes):
            req.error = NO_CAPACITY
            self._inflight -= 1
            return
        if not self._reserve(req):
            self._waiting.append(req)  # retried each time a request finishes and frees blocks

    def _reserve(self, req: SimRequest) -> bool:
        needed = -(-req.input_len // self.config.decode.block_size)
        loads = [d.load() for d in self.decodes]
        d = pick_decode(self.config.router.decode_policy, loads, needed, next(self._turns[1]))
        if d is None or not self.decodes[d].reserve(req, local_prefill=not self.prefills):
            return False
        if not self.prefills:
            return True
        loads_p = [p.load() for p in self.prefills]
        p = pick_prefill(self.config.router.prefill_policy, loads_p, next(self._turns[0]))
        self.prefills[p].submit(req)
        return True

    def first_token(self, req: SimRequest) -> None:
        req.first_token_s = self.now + self.profile.overheads.return_ms * MS
        self._stream_cpu.add(1)

    def streamed(self, tokens: int) -> None:
        self._stream_cpu.add(tokens)

    def finished(self, req: SimRequest) -> None:
        req.done_s = self.now + self.profile.overheads.return_ms * MS
        self._inflight -= 1
        # every waiter wakes and tries again, oldest first (the router's notify_all)
        waiting, self._waiting = self._waiting, deque()
        for r in waiting:
            if not self._reserve(r):
                self._waiting.append(r)


class StreamCpu:
    """The controller's and the client's CPU per streamed token (measured by the profile), as
    one more thread wanting a core; only on a CPU host, where it competes with the workers."""

    def __init__(self, cpu: CpuShare, ms_per_token: float) -> None:
        self.cpu, self.ms_per_token = cpu, ms_per_token
        self._pending_ms, self._running = 0.0, False

    def add(self, tokens: int) -> None:
        if self.cpu.cores is None or self.ms_per_token <= 0:
            return
        self._pending_ms += tokens * self.ms_per_token
        if not self._running:
            self._start()

    def _start(self) -> None:
        ms, self._pending_ms, self._running = self._pending_ms, 0.0, True
        self.cpu.run(self, ms, 1, self._done, kind=None)  # light on memory: no co-run term

    def _done(self) -> None:
        self._running = False
        if self._pending_ms > 0:
            self._start()


def simulate(
    profile: Profile,
    placement: Placement,
    planned: Sequence[PlannedShape],
    slos_ms: Mapping[str, float],
    config: DeploymentConfig | None = None,
    host: HostCpu | None = None,
) -> SimResult:
    """Run ``placement`` with ``config``'s engine settings (default: the profile's spec)."""
    return Simulation(profile, placement, config, host).run(planned, slos_ms)


def _record(r: SimRequest) -> RequestRecord:
    rec = RequestRecord(r.index, r.input_len, r.output_len, r.arrival_s, r.arrival_s)
    if r.error or r.first_token_s is None or r.done_s is None:
        rec.error = r.error or "no first token"
        return rec
    rec.success = True
    rec.ttft_s = r.first_token_s - r.arrival_s
    rec.e2el_s = r.done_s - r.arrival_s
    rec.output_tokens = r.output_len
    return rec


def _breakdown(requests: Sequence[SimRequest]) -> dict[str, float]:
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
