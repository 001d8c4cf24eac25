"""Continuous batching for one decode replica: which sequences decode this step, and who yields
KV blocks when the cache runs out. Pure Python over plain objects (no torch, no Ray)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from pdserve.decode_worker.scheduler_integrity import check_scheduler
from pdserve.decode_worker.seq import (
    DecodeSeq,
    PromptTooLongError,
    ScheduleOutput,
    SchedulerError,
    SeqStatus,
)
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Reservation

__all__ = ["DecodeScheduler", "DecodeSeq", "PromptTooLongError", "ScheduleOutput", "SchedulerError"]


class DecodeScheduler:
    """FCFS continuous batching with recompute preemption for one decode replica.

    Life of a seq (blocks are held in `blocks` under the seq_id)::

        reserve(id, n)          activate(seq)           schedule
        ─────────────▶ reserved ─────────────▶ READY ──────────▶ RUNNING ──finish──▶ forgotten
        blocks for n            prompt K/V      │                  │  ▲
        prompt tokens           arrived         │ evicted  evicted │  │ schedule: re-admitted,
                                                ▼                  │  │ the worker recomputes
                                            PREEMPTED ◀────────────┘  │ the K/V
                                            (no blocks) ──────────────┘

        abort(id) forgets a seq in any state and frees its blocks.

    Step protocol: `schedule()`; the worker runs a prefill over `token_ids[:-1]` for each seq in
    `recompute`, from `recompute_start(seq)` on (the blocks before are prefix-cache hits on
    `seq.block_hashes`; their cache counts as rebuilt from now on) and one decode step for each seq in
    `decode`, appends each sampled token to `seq.token_ids`, calls `on_step_done(decode)`, and
    `finish()`es every seq that hit a stop condition or `reached_length_limit`.

    Priority is running (admission order) > ready (activation order) > preempted (activation
    order). A seq that needs a block when none is free evicts the lowest-priority holder below it:
    ready seqs newest first (they have done no decode work yet), then running seqs newest first,
    which may be the seq itself. A seq can always fit alone (max_model_len <= cache size), so a
    running seq that evicts itself does so only because unpreemptable reservations (K/V in flight)
    hold the rest; it is recomputed once they drain. A ready seq never evicts itself: it keeps its
    transferred K/V and waits. A step that preempted re-admits no preempted seq (it would be the
    next victim), and re-admission waits until the seq's next decode step fits too.
    """

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_model_len: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} is invalid: must be >= 1")
        capacity = blocks.num_blocks * blocks.block_size
        if not 2 <= max_model_len <= capacity:
            raise ValueError(
                f"max_model_len={max_model_len} must be in [2, {capacity}] (the KV cache holds "
                f"{capacity} tokens): lower max_model_len or give the cache more blocks"
            )
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self._reserved: dict[int, int] = {}  # seq_id -> prompt tokens reserved
        self._seqs: dict[int, DecodeSeq] = {}  # every activated seq not yet finished
        self._running: list[DecodeSeq] = []  # admission order
        self._ready: list[DecodeSeq] = []  # activation order
        self._preempted: list[DecodeSeq] = []  # sorted by arrival
        self._arrivals = 0

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Activated seqs not in the batch: ready plus preempted."""
        return len(self._ready) + len(self._preempted)

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def reached_length_limit(self, seq: DecodeSeq) -> bool:
        """True when `seq` must finish for length: max_tokens reached or max_model_len full."""
        return seq.num_output >= seq.max_tokens or len(seq.token_ids) >= self.max_model_len

    # ---- admission -----------------------------------------------------------------------

    def reserve(
        self, seq_id: int, num_prompt_tokens: int, hashes: Sequence[int] = ()
    ) -> Reservation | None:
        """Blocks for the prompt's K/V (they arrive by transfer), or None if there is no room.
        ``hashes``: the block hashes of the prompt's leading full blocks to look up; the cached
        ones are shared (`Reservation.cached_blocks`) and need no K/V."""
        if seq_id in self._reserved or seq_id in self._seqs:
            raise SchedulerError(f"seq {seq_id} is already known on this replica")
        if num_prompt_tokens < 1:
            raise ValueError(f"num_prompt_tokens={num_prompt_tokens} is invalid: must be >= 1")
        if num_prompt_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"a prompt of {num_prompt_tokens} tokens leaves no room to generate: prompts "
                f"must be shorter than max_model_len={self.max_model_len}"
            )
        # reserve before prefill so a finished prefill never waits for decode space
        if not self.blocks.can_allocate(num_prompt_tokens, hashes):
            return None
        self._reserved[seq_id] = num_prompt_tokens
        hits = self.blocks.cached_prefix(hashes)
        table = self.blocks.allocate(seq_id, num_prompt_tokens, hashes)
        return Reservation(tuple(table), hits)

    def activate(self, seq: DecodeSeq) -> None:
        """The prompt's K/V arrived in the reserved blocks; `seq` joins the ready queue."""
        reserved = self._reserved.get(seq.seq_id)
        if reserved is None:
            raise SchedulerError(f"seq {seq.seq_id} was not reserved (or was aborted)")
        if seq.prompt_len != reserved or len(seq.token_ids) != seq.prompt_len + 1:
            raise SchedulerError(
                f"seq {seq.seq_id}: reserved {reserved} prompt tokens but got prompt_len="
                f"{seq.prompt_len} and {len(seq.token_ids)} token ids (want prompt + 1st token)"
            )
        if self.reached_length_limit(seq):
            raise SchedulerError(f"seq {seq.seq_id} is done after prefill; finish it instead")
        del self._reserved[seq.seq_id]
        seq.num_cached, seq.status, seq.arrival = seq.prompt_len, SeqStatus.READY, self._arrivals
        self._arrivals += 1
        self._seqs[seq.seq_id] = seq
        self._ready.append(seq)

    # ---- the step ------------------------------------------------------------------------

    def schedule(self, lookahead: Callable[[DecodeSeq], int] | None = None) -> ScheduleOutput:
        """Pick this step's batch; see the class docstring for the order and preemption.
        ``lookahead(seq)``: draft tokens a decode seq would verify this step (speculative
        decoding); slots for them are taken when free blocks allow, else it decodes one token
        (`ScheduleOutput.lookahead` says how many it got)."""
        self._check_schedulable()
        out = ScheduleOutput()
        for seq in list(self._running):
            if seq.status is SeqStatus.RUNNING and self._make_room(seq, out.preempted):
                self._grow(seq, lookahead, out)
        self._admit_ready(out, lookahead)
        self._admit_preempted(out)
        return out

    def _grow(
        self, seq: DecodeSeq, lookahead: Callable[[DecodeSeq], int] | None, out: ScheduleOutput
    ) -> None:
        """Slots for ``seq``'s decode token, and for its drafts when they fit without evicting."""
        extra = lookahead(seq) if lookahead is not None else 0
        if extra and self.blocks.can_append(seq.seq_id, seq.num_cached + 1 + extra):
            out.lookahead[seq.seq_id] = extra
        self.blocks.append(seq.seq_id, seq.num_cached + 1 + out.lookahead.get(seq.seq_id, 0))
        out.decode.append(seq)

    def on_step_done(
        self, seqs: Sequence[DecodeSeq], advances: Sequence[int] | None = None
    ) -> None:
        """Each seq's step is cached: ``num_cached += advance`` (1 without drafts; with them,
        the tokens the step emitted: its input token and the accepted drafts are cached). The
        slots of rejected drafts are given back: whole blocks freed, the rest overwritten."""
        advances = [1] * len(seqs) if advances is None else advances
        if len({seq.seq_id for seq in seqs}) != len(seqs) or len(advances) != len(seqs):
            raise SchedulerError("on_step_done got the same seq twice, or a wrong advance list")
        for seq, advance in zip(seqs, advances):
            known = self._seqs.get(seq.seq_id)
            if known is not seq or seq.status is not SeqStatus.RUNNING:
                raise SchedulerError(f"seq {seq.seq_id} is not running on this replica")
            if not 1 <= advance <= self.blocks.num_tokens(seq.seq_id) - seq.num_cached:
                raise SchedulerError(f"seq {seq.seq_id} was not scheduled for decode this step")
        for seq, advance in zip(seqs, advances):
            seq.num_cached += advance
            self.blocks.truncate(seq.seq_id, seq.num_cached)

    def finish(self, seq_id: int) -> None:
        """`seq_id` finished (stop or length): free its blocks and forget it."""
        if not self.abort(seq_id):
            raise SchedulerError(f"cannot finish seq {seq_id}: unknown on this replica")

    def abort(self, seq_id: int) -> bool:
        """Forget `seq_id` in whatever state, freeing its blocks; False if it is unknown."""
        if self._reserved.pop(seq_id, None) is not None:
            self.blocks.free(seq_id)
            return True
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return False
        self.blocks.free(seq_id)
        self._queue_of(seq).remove(seq)
        seq.status, seq.num_cached = SeqStatus.FINISHED, 0
        return True

    # ---- internals -----------------------------------------------------------------------

    def _check_schedulable(self) -> None:
        # checked up front so a protocol error leaves the scheduler untouched
        for seq in self._running + self._ready:
            if seq.num_cached != len(seq.token_ids) - 1:
                raise SchedulerError(
                    f"seq {seq.seq_id} has {len(seq.token_ids)} tokens but {seq.num_cached} "
                    "cached: append each sampled token and call on_step_done after every step"
                )
            if self.reached_length_limit(seq):
                raise SchedulerError(
                    f"seq {seq.seq_id} reached its length limit; finish it before scheduling"
                )

    def _make_room(self, seq: DecodeSeq, preempted: list[DecodeSeq]) -> bool:
        """Evict lower-priority seqs until `seq` can cache one more token. False if `seq` itself
        had to go (a running seq is preempted; a ready seq just stays ready)."""
        while not self.blocks.can_append(seq.seq_id, seq.num_cached + 1):
            victim = self._victim(seq)
            if victim is None:
                return False
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _victim(self, seq: DecodeSeq) -> DecodeSeq | None:
        if self._ready and self._ready[-1] is not seq:
            return self._ready[-1]
        if seq.status is SeqStatus.RUNNING:
            return self._running[-1]  # may be seq itself
        return None

    def _preempt(self, seq: DecodeSeq) -> None:
        self.blocks.free(seq.seq_id)
        self._queue_of(seq).remove(seq)
        seq.status, seq.num_cached = SeqStatus.PREEMPTED, 0
        bisect.insort(self._preempted, seq, key=lambda s: s.arrival)

    def _admit_ready(
        self, out: ScheduleOutput, lookahead: Callable[[DecodeSeq], int] | None
    ) -> None:
        while self._ready and len(self._running) < self.max_num_seqs:
            seq = self._ready[0]
            if not self._make_room(seq, out.preempted):
                return
            self._ready.pop(0)
            self._running.append(seq)
            seq.status = SeqStatus.RUNNING
            self._grow(seq, lookahead, out)

    def _admit_preempted(self, out: ScheduleOutput) -> None:
        if out.preempted:
            return  # a seq re-admitted now would be the next victim
        while self._preempted and len(self._running) < self.max_num_seqs:
            seq = self._preempted[0]
            n = len(seq.token_ids) - 1  # positions to rebuild; at least one is computed
            hashes = seq.block_hashes[: (n - 1) // self.blocks.block_size]
            # room for its next decode step too, so it is not evicted right after the recompute
            if not self.blocks.can_allocate(n + 1, hashes):
                return
            hits = self.blocks.cached_prefix(hashes)
            self.blocks.allocate(seq.seq_id, n, hashes)
            self._preempted.pop(0)
            self._running.append(seq)
            seq.status, seq.num_cached = SeqStatus.RUNNING, n
            out.recompute.append(seq)
            if hits:
                out.recompute_from[seq.seq_id] = hits * self.blocks.block_size

    def _queue_of(self, seq: DecodeSeq) -> list[DecodeSeq]:
        queues = {
            SeqStatus.READY: self._ready,
            SeqStatus.RUNNING: self._running,
            SeqStatus.PREEMPTED: self._preempted,
        }
        return queues[seq.status]

    # ---- self-check ----------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise SchedulerError (or BlockManagerError) if queues, statuses and blocks disagree
        (``scheduler_integrity.py``)."""
        check_scheduler(
            self.blocks,
            self.max_num_seqs,
            self._reserved,
            self._seqs,
            self._running,
            self._ready,
            self._preempted,
        )
