"""The decode engine's request table: what it holds per request, from the reservation until
the request is dropped, and the bookkeeping that is not a step's.

- admission: ``reserve`` takes the prompt's blocks (sharing its cached prefix) before its KV
  comes; a colocated request joins the local prefill queue;
- KV landing: ``kv_landed`` counts each head slice's parts; with every slice's last part and
  the first token here, ``land`` starts the sequence in the scheduler (or finishes it at once);
- leases: ``expire`` frees a reservation whose KV stopped coming for ``decode.kv_lease_s``;
- every exit goes through ``drop``, which frees the blocks once and forgets the request.

``DecodeEngine`` (``engine.py``) exposes these verbs and runs the steps over the same table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from pdserve.decode_worker.prefill_queue import LocalPrefillQueue
from pdserve.decode_worker.prefix_cache import PrefixCache
from pdserve.decode_worker.scheduler import DecodeScheduler
from pdserve.decode_worker.seq import DecodeSeq
from pdserve.decode_worker.step import EngineLimits, HeldRequest, Output
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import DecodeRequest, Reservation, StepDelta
from pdserve.engine.stop import check_token_stop


class RequestTable:
    """The requests one engine holds (by transfer id) and the verbs that are not a step's."""

    def __init__(
        self,
        limits: EngineLimits,
        blocks: BlockManager,
        prefix: PrefixCache,
        scheduler: DecodeScheduler,
        prefills: LocalPrefillQueue,
    ) -> None:
        self.limits = limits
        self.blocks = blocks
        self.prefix = prefix
        self.scheduler = scheduler
        self.prefills = prefills
        self.held: dict[int, HeldRequest] = {}
        self.deferred: set[int] = set()  # aborted while in the planned step
        self.leases_expired = 0  # reservations freed because their KV never came (expire)
        self.on_drop: Callable[[int], None] | None = None  # told each transfer id dropped

    def reserve(
        self, req: DecodeRequest, num_computed: int = 0, now: float = 0.0
    ) -> Reservation | None:
        """Blocks for the prompt's KV before its prefill runs; None when they do not fit now.
        Leading blocks found in the prefix cache are shared (``cached_blocks``): no KV comes
        for them. A colocated request (``local_prefill``) joins the local prefill queue, its
        cached blocks (or, if more, its first ``num_computed`` positions) counted as computed."""
        prompt = req.prompt_token_ids
        hashes = self.prefix.prompt_hashes(prompt)
        lookup = self.prefix.lookup(hashes, len(prompt), req.local_prefill)
        res = self.scheduler.reserve(req.transfer_id, len(prompt), lookup)
        if res is None:
            return None
        self.prefix.count(len(prompt), res.cached_blocks)
        self.held[req.transfer_id] = HeldRequest(
            req, cached_blocks=res.cached_blocks, hashes=hashes, kv_at=now
        )
        if req.local_prefill:
            cached = res.cached_blocks * self.limits.block_size
            self.prefills.add(req.transfer_id, len(prompt), max(num_computed, cached))
        return res

    def knows(self, tid: int) -> bool:
        return tid in self.held

    def expects_kv(
        self, tid: int, block_ids: Sequence[int], first_block: int = 0, last: bool = True
    ) -> bool:
        """Whether KV for ``tid`` into ``block_ids`` (its table from ``first_block`` on) may be
        written now: reserved, not running, blocks of its table past its cached prefix; a
        ``last`` part (or a whole prompt) reaches the table's end. Only reads: safe from a
        receiver thread."""
        held = self.held.get(tid)
        if held is None or held.running or first_block < held.cached_blocks:
            return False
        table = self.blocks.block_table(tid)
        end = len(table) if last else first_block + len(block_ids)
        return end <= len(table) and tuple(table[first_block:end]) == tuple(block_ids)

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
        """A slice of ``heads`` KV heads (and, from prefill rank 0, the first token) landed;
        once every head's ``last`` part and the first token are here the request starts
        decoding. An earlier part (a chunk of a chunked prefill) only adds its bytes."""
        held = self.held.get(tid)
        if held is None:
            return []
        held.kv_bytes += nbytes
        held.transfer_s = max(held.transfer_s, seconds)
        held.kv_at = max(held.kv_at, now)
        if not last:
            return []
        held.heads += heads
        if first_token is not None:
            held.first_token = first_token
        if held.heads == self.limits.num_kv_heads and held.first_token is not None:
            return self.land(held)
        return []

    def kv_failed(self, tid: int, message: str) -> list[Output]:
        """The transfer into ``tid``'s blocks failed: the request fails (unless it already runs)."""
        held = self.held.get(tid)
        if held is None or held.running:
            return []
        return self.drop(held, StepDelta(error=message))

    def expire(self, now: float, lease_s: float, receiving: Callable[[int], bool]) -> list[Output]:
        """Free every reservation whose KV has not arrived for ``lease_s`` seconds (none of it
        since it was reserved, or no part since the last one): its router or prefill died, or
        it was aborted while KV seemed on its way. ``receiving(tid)``: a link writes it now
        (a stalled batch is the receiver's to abort). Counted in ``leases_expired``."""
        stale = [
            h for tid, h in self.held.items()
            if not (h.running or h.req.local_prefill or receiving(tid))
            and now - h.kv_at >= lease_s
        ]  # fmt: skip
        outputs: list[Output] = []
        for held in stale:
            self.leases_expired += 1
            why = (
                f"its KV did not arrive within decode.kv_lease_s ({lease_s:g} s): the "
                "reservation expired and its blocks were freed"
            )
            outputs += self.drop(held, StepDelta(error=why))
        return outputs

    def fail(self, tids: Iterable[int], message: str) -> list[Output]:
        """Fail these requests with ``message``, freeing their blocks."""
        outputs: list[Output] = []
        for tid in list(tids):
            if tid in self.held:
                outputs += self.drop(self.held[tid], StepDelta(error=message))
        return outputs

    def land(self, held: HeldRequest) -> list[Output]:
        """All KV slices and the first token are here: start decoding (or finish at once)."""
        req = held.req
        self.blocks.register(req.transfer_id, held.hashes)  # the prompt's KV is all here
        if held.aborted:
            return self.drop(held, StepDelta(finish_reason="abort"))
        assert held.first_token is not None
        prompt = list(req.prompt_token_ids)
        max_tokens = req.sampling.max_tokens - req.num_replayed  # a replay's outputs count
        seq = DecodeSeq(req.transfer_id, len(prompt), max_tokens, [*prompt, held.first_token])
        seq.block_hashes = list(held.hashes)
        reused = held.cached_blocks * self.limits.block_bytes
        first = StepDelta(kv_bytes=held.kv_bytes, kv_reused_bytes=reused)
        first.transfer_s = held.transfer_s
        if req.local_prefill:  # nobody else has streamed the first token
            first.token_ids, first.logprobs = [held.first_token], [held.first_logprobs]
        first.finish_reason = self.stop_reason(req, seq, held.first_token)
        if first.finish_reason is not None:
            return self.drop(held, first)
        self.scheduler.activate(seq)
        held.running = True
        return [(req.transfer_id, first)]

    def stop_reason(self, req: DecodeRequest, seq: DecodeSeq, token: int) -> str | None:
        lim = self.limits
        reason = check_token_stop(
            token, seq.num_output + req.num_replayed, len(seq.token_ids), req.sampling,
            lim.eos_token_ids, lim.max_model_len,
        )  # fmt: skip
        if reason is None and self.scheduler.reached_length_limit(seq):
            reason = "length"
        return reason

    def drop(self, held: HeldRequest, last: StepDelta) -> list[Output]:
        tid = held.req.transfer_id
        self.scheduler.abort(tid)
        self.prefills.remove(tid)
        del self.held[tid]
        self.deferred.discard(tid)
        if self.on_drop is not None:
            self.on_drop(tid)
        return [(tid, last)]
