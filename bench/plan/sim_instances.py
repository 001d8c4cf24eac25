"""The simulator's instances: a prefill TP group and a decode replica (or colocated instance).

They mirror prefill_worker/leader.py and decode_worker/worker.py step for step, with the time
of each forward pass taken from the profile instead of running it. The decode side drives the
real `DecodeEngine` (pure Python without its runner), so continuous batching, max_num_seqs,
block growth, recompute preemption, prefill priority, chunked prefill, prefix caching and the
stop rules are the production code, not a copy of it. With `prefix_caching` on, a prompt's
blocks the decode replica holds are not sent, and a prefill computes only what its cache (the
engine's colocated, `sim_reuse.PrefixLRU` in a prefill pool) does not hold.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pdserve.bench.plan.profile_model import Profile
from pdserve.bench.plan.sim_reuse import SALT, PrefixLRU
from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.step import EngineLimits, EngineStep, Output
from pdserve.engine.batching import take_batch
from pdserve.engine.deploy_config import DeploymentConfig, PrefillSettings
from pdserve.engine.load import DecodeLoad, PrefillLoad
from pdserve.engine.request import DecodeRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplerOutput

MS = 1e-3


@dataclass(eq=False)
class SimRequest:
    """One request's trip through the simulated deployment; times in s from the run's start."""

    index: int
    arrival_s: float
    input_len: int
    output_len: int
    decode: int = -1
    queued_s: float | None = None  # reached the prefill queue (or the local prefill queue)
    prefill_start_s: float | None = None
    prefill_end_s: float | None = None
    landed_s: float | None = None  # KV + first token on the decode side
    first_token_s: float | None = None  # the client has the first token
    done_s: float | None = None  # the client has the last token
    error: str = ""
    prompt: tuple[int, ...] = ()  # token ids (sim_reuse.prompt_ids); () -> input_len zeros
    follows: int | None = None  # a later turn: arrives when that request's answer is back
    computed: int | None = None  # prompt tokens its prefill computed (None: not yet, or all)
    decode_cached: int = 0  # prompt tokens the decode replica held already (KV not sent)
    hashes: list[int] | None = None  # its full blocks' hashes in the prefill cache

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.prompt or (0,) * self.input_len

    @property
    def prefill_len(self) -> int:
        """Prompt tokens the prefill computes."""
        return self.input_len if self.computed is None else self.computed

    @property
    def sent_len(self) -> int:
        """Prompt tokens whose KV crosses the link."""
        return self.input_len - self.decode_cached


class Host(Protocol):
    """What an instance needs from the simulation around it."""

    now: float
    profile: Profile
    config: DeploymentConfig  # the engine settings (batching, decode capacity, routing)
    num_blocks: int  # KV blocks of each decode replica
    prefill_cache_blocks: int  # blocks each prefill instance's prefix cache holds

    def at(self, t: float, fn: Callable[[], None]) -> None: ...
    def busy_for(
        self, owner: object, ms: float, threads: int, done: Callable[[], None], kind: str
    ) -> None:
        """Run `owner`'s computation of `ms` (at profiled speed) on `threads` threads."""

    def first_token(self, req: SimRequest) -> None: ...
    def streamed(self, tokens: int) -> None: ...
    def finished(self, req: SimRequest) -> None: ...


class PrefillSim:
    """A prefill instance: FIFO queue, `take_batch` under the token budget, one batch at a time;
    each batch sends its KV layer by layer while it computes (see `batch_ms`)."""

    def __init__(self, host: Host, index: int, tp: int, decodes: Sequence[DecodeSim]) -> None:
        self.host, self.index, self.tp, self.decodes = host, index, tp, decodes
        self.queue: deque[SimRequest] = deque()
        self.busy = False
        self.queued_tokens = 0  # dispatched and not yet answered, the running batch included
        self.queued_requests = 0
        blocks = host.prefill_cache_blocks if host.config.prefix_caching else 0
        self.cache = PrefixLRU(blocks, host.config.decode.block_size)

    def load(self) -> PrefillLoad:
        return PrefillLoad(self.index, self.queued_tokens, self.queued_requests)

    def submit(self, req: SimRequest) -> None:
        req.queued_s = self.host.now
        self.queue.append(req)
        self.queued_tokens += req.input_len
        self.queued_requests += 1
        if not self.busy:
            self._next()

    def cached_tokens(self, req: SimRequest) -> int:
        """The prompt's leading tokens this instance's cache holds now (cache_aware routing)."""
        if req.hashes is None:
            req.hashes = self.cache.hashes(req.prompt_ids)
        return self.cache.cached_tokens(req.hashes, req.input_len)

    def _next(self) -> None:
        if not self.queue:
            self.busy = False
            return
        k = self.host.config.prefill or PrefillSettings()  # a colocated spec: the defaults
        heads = list(itertools.islice(self.queue, k.max_batch_size))
        for r in heads:  # what each would compute now, its cached prefix aside
            r.computed = r.input_len - self.cached_tokens(r)
        n = take_batch([r.prefill_len for r in heads], k.max_batch_tokens, k.max_batch_size)
        batch = [self.queue.popleft() for _ in range(n)]
        now = self.host.now
        for r in batch:
            r.prefill_start_s = now
        self.busy = True
        ms, threads = (
            batch_ms(self.host.profile, batch, self.tp, self.host.config.decode.kv_cache.dtype),
            self.tp * self.host.profile.threads,
        )
        self.host.busy_for(self, ms, threads, lambda: self._done(batch), "prefill")

    def _done(self, batch: list[SimRequest]) -> None:
        now = self.host.now
        land = now + self.host.profile.land_ms * MS  # trailer + receiver hand-off
        by_decode: dict[int, list[SimRequest]] = {}
        for r in batch:
            self.queued_tokens -= r.input_len
            self.queued_requests -= 1
            r.prefill_end_s = now
            self.cache.add(r.hashes or [])
            self.host.first_token(r)  # TTFT does not wait for the KV tail
            by_decode.setdefault(r.decode, []).append(r)
        for d, reqs in by_decode.items():  # one header per destination: its items land together
            self.host.at(land, lambda d=d, reqs=reqs: self.decodes[d].land(reqs))  # type: ignore[misc]
        self._next()


def batch_ms(
    profile: Profile, batch: Sequence[SimRequest], tp: int, kv_dtype: str = "auto"
) -> float:
    """How long a prefill instance is busy with `batch`: the forward (slowed by the measured
    CPU cost of sending, and by the deployment's measured prefill scale), or longer when the
    link cannot keep up with the layers.

    Each KV-sending rank sends every layer's K and V for its heads as soon as the layer's
    qkv projection has run; one rank's sends go out one after another. The batch is done when
    the forward is done and the last layer has left (`flush`). Only the tokens past each
    prompt's cached prefix are computed, and only those decode does not hold are sent.
    """
    m = profile.model
    scale = profile.overheads.prefill_scale * (1.0 + profile.send_overhead)
    compute = profile.prefill_ms([r.prefill_len for r in batch], tp) * scale
    heads = max(m.num_kv_heads // tp, 1)  # per sending rank; every rank sends in parallel
    per_token = m.kv_bytes_per_token(heads, kv_dtype)
    sent_tokens = sum(r.sent_len for r in batch)
    layer_wire = profile.transfer.wire_ms(sent_tokens * per_token / m.num_layers)
    sent = 0.0
    for layer in range(m.num_layers):
        ready = compute * (layer + m.qkv_fraction) / m.num_layers
        sent = max(sent, ready) + layer_wire
    return max(compute, sent)


class DecodeSim:
    """A decode replica, or colocated an instance running both phases: the production
    `DecodeEngine` (scheduler, local prefill queue, stop rules), planned and committed one step
    at a time as the decode actor does, with step times from the profile instead of a forward."""

    def __init__(self, host: Host, index: int) -> None:
        k = host.config.decode
        self.host, self.index = host, index
        limits = EngineLimits(
            num_blocks=host.num_blocks, block_size=k.block_size,
            max_model_len=host.profile.model.max_model_len, num_kv_heads=1,
            max_num_seqs=k.max_num_seqs, max_num_batched_tokens=k.max_num_batched_tokens,
            chunked_prefill=k.chunked_prefill, prefix_caching=host.config.prefix_caching,
            prefix_salt=SALT,
        )  # fmt: skip
        self.engine = DecodeEngine(None, limits, index)  # the simulation runs the steps
        self.blocks = self.engine.blocks
        self.requests: dict[int, SimRequest] = {}
        self.busy = False

    def load(self) -> DecodeLoad:
        return self.engine.load()

    def cached_blocks(self, req: SimRequest) -> int:
        """The prompt's leading blocks this replica's cache holds now (cache_aware routing: the
        router's index estimates them, the simulation knows)."""
        return self.blocks.cached_prefix(self.engine.prefix.prompt_hashes(req.prompt_ids))

    def reserve(self, req: SimRequest, local_prefill: bool) -> bool:
        """Blocks for the prompt's KV, as the router asks before dispatching its prefill;
        colocated (``local_prefill``), the prompt is queued for this instance's own prefill."""
        params = SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
        request = DecodeRequest(req.index, "", req.prompt_ids, params, local_prefill)
        res = self.engine.reserve(request)
        if res is None:
            return False
        self.requests[req.index] = req
        req.decode = self.index
        req.decode_cached = res.cached_blocks * self.host.config.decode.block_size
        if local_prefill:  # the engine computes the prompt past its cached blocks
            req.computed = req.input_len - req.decode_cached
            req.queued_s = self.host.now
            self._kick()
        return True

    def land(self, reqs: Sequence[SimRequest]) -> None:
        """The prompts' KV and first tokens are here: join the batch, or finish at once."""
        for req in reqs:
            req.landed_s = self.host.now
            self._finish(self.engine.kv_landed(req.index, 1, 0, 0.0, 0))
        self._kick()

    def _finish(self, outputs: Sequence[Output]) -> None:
        for tid, delta in outputs:
            if delta.finish_reason is not None:
                self.host.finished(self.requests.pop(tid))

    def _kick(self) -> None:
        if not self.busy:
            self._run_next()

    def _run_next(self) -> None:
        step = self.engine.plan()
        if step is None:
            self.busy = False
            return
        out, chunks, now = step.out, step.chunks, self.host.now
        for c in chunks:
            if c.start == 0:
                self.requests[c.seq_id].prefill_start_s = now
        spans = [(0, len(s.token_ids) - 1) for s in out.recompute]
        spans += [(c.start, c.end) for c in chunks]
        context = sum(len(s.token_ids) for s in out.decode)
        ms = self.host.profile.step_ms(len(out.decode), context, spans)
        self.busy = True
        kind = "decode" if out.decode else "prefill"  # a step of prompt chunks only: prefill
        self.host.busy_for(self, ms, self.host.profile.threads, lambda: self._done(step), kind)

    def _done(self, step: EngineStep) -> None:
        n = len(step.out.decode) + sum(c.last for c in step.chunks)  # sampled rows
        outputs = self.engine.commit(step, SamplerOutput([0] * n, [None] * n))
        self.host.streamed(len(step.out.decode))
        for c in step.chunks:
            if c.last:  # its first token was sampled: prefilled and landed here
                r = self.requests[c.seq_id]
                r.prefill_end_s = r.landed_s = self.host.now
                self.host.first_token(r)
        self._finish(outputs)  # still busy: the next step starts below
        self._run_next()
