"""The decode engine: one replica's requests, blocks and steps, synchronous and free of Ray,
asyncio and torch (the model runs behind the `StepRunner` it is given).

Life of a request here (keyed by the router's transfer id)::

    reserve ──▶ RESERVED ──KV + first token land──▶ scheduler (ready/running) ──stop──▶ freed
                   │ abort: freed now if no KV is coming, else when it has landed      │
                   └──────────────────────────────────── abort: freed after the step ◀─┘

Colocated mode: the KV comes from this engine's own steps instead (`LocalPrefillQueue`: whole
prompts with priority over decode, or chunk by chunk beside it); the first token is sampled when
a prompt's last chunk has run.

Prefix caching (`PrefixCache`): a reservation shares the prompt's leading blocks already cached
here (``Reservation.cached_blocks``): no KV is sent for them, and colocated they are not
computed. Blocks join the cache as their KV becomes known (landed, prefilled, decoded).

A step is `plan()` (scheduler decisions) -> `prepare()` (the runner's inputs) -> the runner's
forward -> `commit()` (tokens appended, stops checked, blocks freed). `step()` does all four;
the actor runs the forward on a thread so reservations and aborts come in meanwhile, and an
abort of a request in the running step takes effect at its commit. Every verb returns the
`Output`s it produced: (transfer id, delta) pairs for the request streams.

Here: the steps, aborts and the engine's state. What is held per request from its reservation
until it is dropped (admission, KV landing, leases, the one exit that frees) is the
`RequestTable`'s (``request_table.py``); the engine's verbs for those hand over to it. The
runner's inputs that `prepare()` returns are built in ``step_inputs.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from pdserve.decode_worker.prefill_queue import LocalPrefillQueue
from pdserve.decode_worker.prefix_cache import PrefixCache
from pdserve.decode_worker.request_table import RequestTable
from pdserve.decode_worker.scheduler import DecodeScheduler
from pdserve.decode_worker.seq import DecodeSeq, ScheduleOutput
from pdserve.decode_worker.speculator import Speculator
from pdserve.decode_worker.step import EngineLimits, EngineStep, Output, StepBatch, StepRunner
from pdserve.decode_worker.step_inputs import step_batch
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.load import DecodeLoad
from pdserve.engine.request import DecodeRequest, Reservation, StepDelta
from pdserve.engine.sampling_types import SamplerOutput, TokenLogprobs
from pdserve.engine.speculative import Proposer, SpecCounters


class DecodeEngine:
    """Owns the block manager, the continuous-batching scheduler, the local prefill queue, the
    request table and the runner of one decode replica (or colocated instance)."""

    def __init__(
        self,
        runner: StepRunner | None,
        limits: EngineLimits,
        instance: int = 0,
        proposer: Proposer | None = None,
    ) -> None:
        self.runner = runner  # None: the caller runs steps itself (the simulator)
        self.limits = limits
        self.instance = instance
        self.blocks = BlockManager(limits.num_blocks, limits.block_size, limits.prefix_caching)
        self.prefix = PrefixCache(self.blocks, limits.prefix_salt)
        self.scheduler = DecodeScheduler(self.blocks, limits.max_num_seqs, limits.max_model_len)
        self.prefills = LocalPrefillQueue(
            limits.max_num_batched_tokens, limits.max_num_seqs, limits.chunked_prefill
        )
        self.requests = RequestTable(
            limits, self.blocks, self.prefix, self.scheduler, self.prefills
        )
        self.num_preemptions = 0
        self._held = self.requests.held  # the table's, by transfer id
        self._step: EngineStep | None = None  # planned and not yet committed
        self._deferred = self.requests.deferred  # aborted while in the planned step
        # speculative decoding (decode.speculative): drafts verified in the decode step
        self.spec = limits.speculative
        self.speculator = None
        if self.spec is not None:
            self.speculator = Speculator(self.spec, limits, self.scheduler, self._held, proposer)
            self.requests.on_drop = self.speculator.forget

    # -- admission, KV landing, leases (``request_table.py``) ---------------------------------

    def reserve(
        self, req: DecodeRequest, num_computed: int = 0, now: float = 0.0
    ) -> Reservation | None:
        """Blocks for the prompt's KV before its prefill runs (``RequestTable.reserve``)."""
        return self.requests.reserve(req, num_computed, now)

    def knows(self, tid: int) -> bool:
        return self.requests.knows(tid)

    def expects_kv(
        self, tid: int, block_ids: Sequence[int], first_block: int = 0, last: bool = True
    ) -> bool:
        """Whether KV for ``tid`` into ``block_ids`` may be written now; only reads."""
        return self.requests.expects_kv(tid, block_ids, first_block, last)

    def kv_landed(
        self,
        tid: int,
        heads: int,
        nbytes: int,
        seconds: float,
        first_token: int | None,
        last: bool = True,
        now: float = 0.0,
    ) -> list[Output]:
        """A slice of KV heads landed (``RequestTable.kv_landed``)."""
        return self.requests.kv_landed(tid, heads, nbytes, seconds, first_token, last, now)

    def kv_failed(self, tid: int, message: str) -> list[Output]:
        """The transfer into ``tid``'s blocks failed: the request fails (unless it already runs)."""
        return self.requests.kv_failed(tid, message)

    def expire(self, now: float, lease_s: float, receiving: Callable[[int], bool]) -> list[Output]:
        """Free every reservation whose KV has not come for ``lease_s`` seconds."""
        return self.requests.expire(now, lease_s, receiving)

    @property
    def leases_expired(self) -> int:
        """Reservations freed because their KV never came (``expire``)."""
        return self.requests.leases_expired

    def fail(self, tids: Iterable[int], message: str) -> list[Output]:
        """Fail these requests with ``message``, freeing their blocks."""
        return self.requests.fail(tids, message)

    def abort(self, tid: int, kv_pending: bool) -> list[Output]:
        """Forget a request and free its blocks: now, after the running step if it is in it, or
        (``kv_pending``: a transfer may be writing its blocks) once its KV has landed."""
        held = self._held.get(tid)
        if held is None:
            return []
        in_step = self._step is not None and (held.running or tid in self._step.tids)
        if in_step:
            self._deferred.add(tid)
        elif not held.running and kv_pending:
            held.aborted = True
        else:
            return self.requests.drop(held, StepDelta(finish_reason="abort"))
        return []

    # -- the step ---------------------------------------------------------------------------

    def plan(self) -> EngineStep | None:
        """This step's batch, or None when there is nothing to run."""
        assert self._step is None, "commit() or fail_step() the planned step first"
        if self.prefills.prefill_only:  # colocated, prefill priority: no decode this step
            step = EngineStep(ScheduleOutput(), self.prefills.schedule(0))
        else:
            # decode first (with drafts to verify, if speculating); chunked prefill gets the
            # budget left
            spec = self.speculator
            out = self.scheduler.schedule(spec.lookahead if spec else None)
            step = EngineStep(out, self.prefills.schedule(out.num_tokens))
            if spec is not None and out.lookahead:
                step.drafts = spec.propose(out)
        self.num_preemptions += len(step.out.preempted)
        if not (step.out.decode or step.out.recompute or step.chunks):
            return None
        self._step = step
        return step

    def prepare(self, step: EngineStep) -> StepBatch:
        """The runner's inputs (``step_inputs.py``): recomputes, then prompt chunks; rows for
        the decode seqs, then for the prompts whose last chunk runs."""
        return step_batch(step, self.blocks.block_table, self._held)

    def commit(self, step: EngineStep, result: SamplerOutput | None) -> list[Output]:
        """The step ran: append each sampled token, stop what must stop, land finished prompts."""
        decode = step.out.decode
        sampled = result or SamplerOutput([], [])
        deltas, advances = [], []
        n = 0  # sampled rows used: one per decode token and draft
        for seq in decode:
            drafts = step.drafts.get(seq.seq_id, ())
            rows = slice(n, n + 1 + len(drafts))
            n = rows.stop
            delta = self._append(seq, drafts, sampled.token_ids[rows], sampled.logprobs[rows])
            deltas.append(delta)
            advances.append(len(delta.token_ids))
        self.scheduler.on_step_done(decode, advances)  # rejected drafts' slots given back
        self.prefix.on_step(decode, step.out.recompute)  # before a finished seq's blocks go
        outputs: list[Output] = []
        for seq, delta in zip(decode, deltas):
            if delta.finish_reason is None:
                outputs.append((seq.seq_id, delta))
            else:
                outputs += self.requests.drop(self._held[seq.seq_id], delta)
        self.prefills.on_done(step.chunks)
        finished = [c for c in step.chunks if c.last]  # their first tokens follow the decode ones
        for c, token, logprobs in zip(finished, sampled.token_ids[n:], sampled.logprobs[n:]):
            held = self._held[c.seq_id]
            held.first_token, held.first_logprobs = token, logprobs
            held.heads = self.limits.num_kv_heads
            outputs += self.requests.land(held)
        return outputs + self._end_step()

    def fail_step(self, step: EngineStep, message: str) -> list[Output]:
        """The step's forward raised: its requests fail, the engine serves on."""
        outputs = self.fail(step.tids, message)
        return outputs + self._end_step()

    def fail_held(self, message: str) -> list[Output]:
        """Fail every request the steps own (decoding, or colocated awaiting its prefill), after
        an error outside the forward; requests whose KV is still on its way are kept."""
        self._step = None
        held = [t for t, h in self._held.items() if h.running or h.req.local_prefill]
        return self.fail(held, message)

    def step(self) -> list[Output]:
        """Plan, run and commit one step in this thread; [] when idle."""
        assert self.runner is not None, "an engine without a runner is stepped by its caller"
        step = self.plan()
        if step is None:
            return []
        try:
            result = self.runner.run(self.prepare(step))
        except Exception as e:  # a failed step fails its requests, never the engine
            return self.fail_step(step, f"step failed: {type(e).__name__}: {e}")
        return self.commit(step, result)

    # -- state ------------------------------------------------------------------------------

    @property
    def spec_counters(self) -> SpecCounters:
        """Speculative decoding's counters (all 0 when it is off)."""
        return self.speculator.counters if self.speculator else SpecCounters()

    @property
    def num_requests(self) -> int:
        return len(self._held)

    @property
    def has_work(self) -> bool:
        """Something a step could run: running, waiting or colocated prompts."""
        s = self.scheduler
        return bool(s.num_running or s.num_waiting or len(self.prefills))

    def load(self) -> DecodeLoad:
        s = self.scheduler
        return DecodeLoad(
            self.instance,
            self.blocks.num_free_blocks,
            self.blocks.num_blocks,
            s.num_running + self.prefills.num_partial,
            s.num_waiting + self.prefills.num_waiting,  # colocated: prompts not yet prefilled
        )

    def check_integrity(self) -> int:
        """Raise if any block is lost or double-owned, or held by a forgotten request; returns
        the number of requests held."""
        self.scheduler.check_integrity()
        owners = set(self.blocks.owners())
        assert owners <= set(self._held), (
            f"blocks held by forgotten requests: {owners - set(self._held)}"
        )
        return len(self._held)

    # -- internals --------------------------------------------------------------------------

    def _append(
        self,
        seq: DecodeSeq,
        drafts: Sequence[int],
        sampled: Sequence[int],
        logprobs: Sequence[TokenLogprobs | None],
    ) -> StepDelta:
        """Append what the step emits for ``seq`` (its token, or the accepted drafts and the
        next draw), token by token until one stops it."""
        emitted = list(sampled)
        if drafts:
            assert self.speculator is not None
            emitted = self.speculator.emitted(seq.seq_id, drafts, sampled)
        req = self._held[seq.seq_id].req
        delta = StepDelta()
        for token, lp in zip(emitted, logprobs):
            seq.token_ids.append(token)
            delta.token_ids.append(token)
            delta.logprobs.append(lp)
            delta.finish_reason = self.requests.stop_reason(req, seq, token)
            if delta.finish_reason is not None:
                break
        return delta

    def _end_step(self) -> list[Output]:
        """The step is over: aborts that waited for it take effect."""
        self._step = None
        aborts = set(self._deferred)
        self._deferred.clear()
        outputs: list[Output] = []
        for tid in aborts:
            if tid in self._held:
                outputs += self.requests.drop(self._held[tid], StepDelta(finish_reason="abort"))
        return outputs
