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

Workloads with reuse (`shared-prefix`, `multi-turn`) run as the bench sends them: prompts share
token ids where their texts share a prefix (`sim_reuse.prompt_ids`), and a later turn of a
conversation arrives when the client has the answer before it (closed loop; it fails unsent if
that turn failed). With the deployment's `prefix_caching` on, cache hits on decode (the real
engine's prefix cache) and in each prefill instance (`sim_reuse.PrefixLRU` of
`prefill_cache_blocks`) cut the KV sent and the tokens prefilled; `SimResult.reuse` sums them.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.bench.plan.cpu_share import CpuShare, StreamCpu
from pdserve.bench.plan.placement import Placement, kv_blocks, profile_config
from pdserve.bench.plan.placement import prefill_cache_blocks as plan_cache_blocks
from pdserve.bench.plan.profile_model import Profile
from pdserve.bench.plan.sim_instances import MS, DecodeSim, PrefillSim, SimRequest
from pdserve.bench.plan.sim_records import breakdown, sim_record
from pdserve.bench.plan.sim_reuse import ReuseTotals, prompt_ids
from pdserve.bench.serve.arrivals import request_arrivals
from pdserve.bench.serve.conversation import EARLIER_TURN_FAILED
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
    """Lengths and arrival times exactly as `bench.serve.runner.plan_requests` draws them (a
    later turn's arrival: 0 here, the answer before it in the simulation)."""
    length_seed, arrival_seed, _ = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
    shapes = clip_to_context(workload.sample(num_prompts, length_seed), max_model_len)
    if isinstance(workload, TraceWorkload) and workload.replays_timestamps:
        arrivals = workload.arrival_times(num_prompts)
    else:
        follows = [s.follows for s in shapes]
        arrivals = request_arrivals(follows, rate, burstiness, arrival_seed)
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
    reuse: ReuseTotals  # prompt tokens computed and KV moved, over the successes

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
        prefill_cache_blocks: int | None = None,
    ) -> None:
        self.profile = profile
        self.config = config or profile_config(profile)
        self.num_blocks = kv_blocks(self.config, profile)
        # None: the spec's prefill.kv_cache (spec prefix_caching off: none used)
        self.prefill_cache_blocks = (
            plan_cache_blocks(self.config, profile, placement.prefill_tp)
            if prefill_cache_blocks is None
            else prefill_cache_blocks
        )
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
        self._next_turns: dict[int, list[SimRequest]] = {}  # request -> the turns that follow it

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._order), fn))

    def busy_for(
        self, owner: object, ms: float, threads: int, done: Callable[[], None], kind: str
    ) -> None:
        self.cpu.run(owner, ms, threads, done, kind)

    def run(self, planned: Sequence[PlannedShape], slos_ms: Mapping[str, float]) -> SimResult:
        prompts = prompt_ids([p.shape for p in planned])
        for i, (p, ids) in enumerate(zip(planned, prompts)):
            s = p.shape
            req = SimRequest(
                i, p.arrival_s, s.input_len, s.output_len, prompt=ids, follows=s.follows
            )
            self.requests.append(req)
            if s.follows is None:
                self.at(p.arrival_s, lambda r=req: self._arrive(r))  # type: ignore[misc]
            else:  # arrives when the answer before it is back
                self._next_turns.setdefault(s.follows, []).append(req)
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()
        for req in self.requests:  # nothing left to happen: whoever did not finish failed
            if req.done_s is None and not req.error:
                req.error = "never finished (simulation drained with the request in flight)"
                self._fail_next_turns(req)
        records = [sim_record(r) for r in self.requests]
        end = max((r.done_s or r.arrival_s for r in self.requests), default=0.0)
        summary = summarize(records, max(end, 1e-9), slos_ms)
        return SimResult(records, summary, breakdown(self.requests), self._reuse())

    def _reuse(self) -> ReuseTotals:
        ok = [r for r in self.requests if r.done_s is not None]
        per_token = self.profile.model.kv_bytes_per_token(
            kv_dtype=self.config.decode.kv_cache.dtype
        )
        cached = sum(r.decode_cached for r in ok)
        return ReuseTotals(
            prompt_tokens=sum(r.input_len for r in ok),
            prefill_computed=sum(r.prefill_len for r in ok),
            decode_cached=cached,
            kv_sent_bytes=0 if not self.prefills else sum(r.sent_len for r in ok) * per_token,
            kv_reused_bytes=cached * per_token,
        )

    def _fail(self, req: SimRequest, error: str) -> None:
        req.error = error
        self._fail_next_turns(req)

    def _fail_next_turns(self, req: SimRequest) -> None:
        """A failed turn ends its conversation: the turns after it are never sent."""
        for nxt in self._next_turns.pop(req.index, []):
            self._fail(nxt, EARLIER_TURN_FAILED)

    # -- the router ---------------------------------------------------------------------------

    def _arrive(self, req: SimRequest) -> None:
        if self._inflight >= self.config.router.max_queued_requests:
            self._fail(req, QUEUE_FULL)
            return
        self._inflight += 1
        dispatch = self.profile.overheads.dispatch_ms * MS
        self.at(self.now + dispatch, lambda: self._dispatch(req))

    def _dispatch(self, req: SimRequest) -> None:
        needed = -(-req.input_len // self.config.decode.block_size)
        if all(needed > d.blocks.num_blocks for d in self.decodes):
            self._fail(req, NO_CAPACITY)
            self._inflight -= 1
            return
        if not self._reserve(req):
            self._waiting.append(req)  # retried each time a request finishes and frees blocks

    def _reserve(self, req: SimRequest) -> bool:
        needed = -(-req.input_len // self.config.decode.block_size)
        loads, policy = [d.load() for d in self.decodes], self.config.router.decode_policy
        hits = {d.index: d.cached_blocks(req) for d in self.decodes if policy == "cache_aware"}
        d = pick_decode(policy, loads, needed, next(self._turns[1]), hits)
        if d is None or not self.decodes[d].reserve(req, local_prefill=not self.prefills):
            return False
        if not self.prefills:
            return True
        loads_p, policy = [p.load() for p in self.prefills], self.config.router.prefill_policy
        cached = {p.index: p.cached_tokens(req) for p in self.prefills if policy == "cache_aware"}
        p = pick_prefill(policy, loads_p, next(self._turns[0]), cached)
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
        for nxt in self._next_turns.pop(req.index, []):  # the client sends the next turn
            nxt.arrival_s = req.done_s
            self.at(nxt.arrival_s, lambda r=nxt: self._arrive(r))  # type: ignore[misc]
        # every waiter wakes and tries again, oldest first (the router's notify_all)
        waiting, self._waiting = self._waiting, deque()
        for r in waiting:
            if not self._reserve(r):
                self._waiting.append(r)


def simulate(
    profile: Profile,
    placement: Placement,
    planned: Sequence[PlannedShape],
    slos_ms: Mapping[str, float],
    config: DeploymentConfig | None = None,
    host: HostCpu | None = None,
    prefill_cache_blocks: int | None = None,
) -> SimResult:
    """Run ``placement`` with ``config``'s engine settings (default: the profile's spec);
    ``prefill_cache_blocks``: each prefill instance's prefix cache (None: the spec's
    prefill.kv_cache; used only with the spec's prefix_caching on)."""
    sim = Simulation(profile, placement, config, host, prefill_cache_blocks)
    return sim.run(planned, slos_ms)
