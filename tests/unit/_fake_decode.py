"""A fake decode replica (a `DecodePort`) over the real block accounting; see `_fake_worker`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from _fake_worker import FakeWorker, gate

from pdserve.decode_worker.scheduler import DecodeScheduler, DecodeSeq
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.load import DecodeLoad
from pdserve.engine.prefix_hash import block_hashes
from pdserve.engine.request import DecodeRequest, Reservation, StepDelta

FIRST_TOKEN = 1000  # what every fake prefill (and colocated fake decode) samples


@dataclass
class _Held:
    req: DecodeRequest
    queue: asyncio.Queue[StepDelta] = field(default_factory=asyncio.Queue)
    cached_blocks: int = 0  # prompt blocks found in the prefix cache (no KV comes for them)
    seq: DecodeSeq | None = None  # set when its KV landed
    aborted: bool = False  # abort asked while its KV was on its way: free when it lands
    attached: bool = False  # a stream reads its queue


class FakeDecode(FakeWorker):
    """A `DecodePort`. Gates: `reserving` (reserve calls), `listening` (link hosting),
    `stepping` (decode steps; each appends one made-up token to every running seq). With
    ``caching``, a prompt's full blocks join the prefix cache when its KV lands."""

    def __init__(
        self, instance: int, num_blocks: int = 16, block_size: int = 4, caching: bool = False
    ) -> None:
        super().__init__("decode", instance)
        self.blocks = BlockManager(num_blocks, block_size, caching)
        self.scheduler = DecodeScheduler(self.blocks, 8, num_blocks * block_size)
        self.reserving, self.listening, self.stepping = gate(), gate(), gate()
        self.links: list[str] = []
        self.violations: list[str] = []
        self.inflight: set[int] = set()  # transfers whose KV a prefill is sending now
        self._held: dict[int, _Held] = {}
        self._unclaimed: dict[int, asyncio.Queue[StepDelta]] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    # -- the port ---------------------------------------------------------------------------

    async def reserve(self, req: DecodeRequest) -> tuple[Reservation | None, DecodeLoad]:
        self.calls.append(("reserve", req.transfer_id))
        return await self._call(self._reserve(req))

    async def abort(self, transfer_id: int, transfer_pending: bool) -> bool:
        self.calls.append(("abort", transfer_id, transfer_pending))
        return await self._call(self._abort(transfer_id, transfer_pending))

    def stream(self, transfer_id: int) -> AsyncGenerator[StepDelta, None]:
        self.calls.append(("stream", transfer_id))
        held = self._held.get(transfer_id)
        if held is not None:
            held.attached = True
        queue = held.queue if held else self._unclaimed.pop(transfer_id, None)
        return self._deltas(transfer_id, queue)

    async def listen(self, name: str) -> tuple[str, int]:
        self.calls.append(("listen", name))
        return await self._call(self._listen(name))

    async def close_links(self, names: list[str]) -> int:
        self._alive()
        self.calls.append(("close_links", tuple(names)))
        return len(names)

    async def load(self) -> DecodeLoad:
        self._alive()
        return self.current_load()

    # -- what tests and fake prefills use ---------------------------------------------------

    def current_load(self) -> DecodeLoad:
        s = self.scheduler
        return DecodeLoad(
            self.instance, self.blocks.num_free_blocks, self.blocks.num_blocks,
            s.num_running, s.num_waiting,
        )  # fmt: skip

    def held(self) -> set[int]:
        return set(self._held)

    def check_integrity(self) -> int:
        """Raise if blocks are lost or freed under in-flight KV; returns requests held."""
        self.scheduler.check_integrity()
        assert set(self.blocks.owners()) <= set(self._held), "blocks of forgotten requests"
        assert not self.violations, self.violations
        return len(self._held)

    def begin_transfer(self, tid: int) -> None:
        self.inflight.add(tid)

    def land(self, tid: int, first_token: int) -> None:
        """All of the request's KV and its first token are here."""
        self.inflight.discard(tid)
        held = self._held.get(tid)
        if held is None:
            return
        if held.aborted:
            self._drop(held, StepDelta(finish_reason="abort"))
            return
        req = held.req
        prompt = list(req.prompt_token_ids)
        self.blocks.register(tid, self._hashes(prompt))
        max_tokens = req.sampling.max_tokens - req.num_replayed  # a replay's outputs count
        seq = DecodeSeq(tid, len(prompt), max_tokens, [*prompt, first_token])
        reused = held.cached_blocks * self.blocks.block_size  # a byte a token, as kv_bytes
        stats = StepDelta(kv_bytes=len(prompt) - reused, kv_reused_bytes=reused)
        if req.local_prefill:
            stats.token_ids, stats.logprobs = [first_token], [None]
        if self.scheduler.reached_length_limit(seq):
            stats.finish_reason = "length"
            self._drop(held, stats)
            return
        self.scheduler.activate(seq)
        held.seq = seq
        held.queue.put_nowait(stats)
        self._wake.set()

    def fail_transfer(self, tid: int, why: str) -> None:
        """The link carrying the request's KV broke (its receiver drops what was in flight)."""
        self.inflight.discard(tid)
        held = self._held.get(tid)
        if held is not None and held.seq is None:
            self._drop(held, StepDelta(error=why))

    # -- internals --------------------------------------------------------------------------

    async def _reserve(self, req: DecodeRequest) -> tuple[Reservation | None, DecodeLoad]:
        await self._until(self.reserving.wait())
        prompt = req.prompt_token_ids
        blocks = self.scheduler.reserve(req.transfer_id, len(prompt), self._hashes(prompt))
        if blocks is not None:
            self._held[req.transfer_id] = _Held(req, cached_blocks=blocks.cached_blocks)
            if req.local_prefill:  # colocated: prefill it here, at the next step
                self._spawn(self._local_prefill(req.transfer_id))
        if self._loop is None:
            self._loop = self._spawn(self._step_loop())
        return blocks, self.current_load()

    async def _abort(self, tid: int, pending: bool) -> bool:
        self._alive()
        held = self._held.get(tid)
        if held is None:
            return False
        if held.seq is None and (pending or tid in self.inflight):
            if tid in self.inflight and not pending:
                self.violations.append(f"transfer {tid} aborted as if no KV were on its way")
            held.aborted = True
        else:
            self._drop(held, StepDelta(finish_reason="abort"))
        return True

    async def _listen(self, name: str) -> tuple[str, int]:
        await self._until(self.listening.wait())
        self.links.append(name)
        return "fake", 1000 + len(self.links)

    async def _deltas(
        self, tid: int, queue: asyncio.Queue[StepDelta] | None
    ) -> AsyncGenerator[StepDelta, None]:
        if queue is None:
            yield StepDelta(error=f"transfer {tid} is unknown on this decode replica")
            return
        while True:
            delta = await self._until(queue.get())
            while not queue.empty():
                delta.merge(queue.get_nowait())
            delta.load = self.current_load()
            yield delta
            if delta.finish_reason or delta.error:
                return

    def _hashes(self, prompt: Sequence[int]) -> list[int]:
        caching = self.blocks.caching
        return block_hashes(prompt, self.blocks.block_size, 0) if caching else []

    def _drop(self, held: _Held, last: StepDelta) -> None:
        tid = held.req.transfer_id
        self.scheduler.abort(tid)
        del self._held[tid]
        held.queue.put_nowait(last)
        if not held.attached:  # for a stream call still to come
            self._unclaimed[tid] = held.queue
        self._wake.set()

    async def _local_prefill(self, tid: int) -> None:
        await self._until(self.stepping.wait())
        self.land(tid, self._held[tid].req.num_replayed or FIRST_TOKEN)  # see FakePrefill

    async def _step_loop(self) -> None:
        while not self.dead:
            await self._until(self.stepping.wait())
            out = self.scheduler.schedule()
            if not (out.decode or out.recompute):
                self._wake.clear()
                await self._until(self._wake.wait())
                continue
            for seq in out.decode:  # a made-up token: the output's index (replays continue it)
                seq.token_ids.append(seq.num_output + self._held[seq.seq_id].req.num_replayed)
            self.scheduler.on_step_done(out.decode)
            for seq in out.decode:
                done = self.scheduler.reached_length_limit(seq)
                delta = StepDelta([seq.token_ids[-1]], [None], "length" if done else None)
                if done:
                    self._drop(self._held[seq.seq_id], delta)
                else:
                    self._held[seq.seq_id].queue.put_nowait(delta)
            await asyncio.sleep(0)
