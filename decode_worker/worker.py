"""The decode actor: one data-parallel replica around a `DecodeEngine`.

The engine owns requests, blocks and steps; this actor owns what is about processes: the KV
links and their receiver threads, the request streams the router reads, and the event loop that
runs the engine's steps (the forward on a thread, so reservations and aborts come in meanwhile).
The engine itself is built at start-up by ``startup.load_engine``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch

from pdserve.decode_worker.runner import DecodeRunner
from pdserve.decode_worker.startup import load_engine
from pdserve.decode_worker.step import Output
from pdserve.engine.deploy_config import DeploymentConfig, resolve_host
from pdserve.engine.load import DecodeLoad, DecodeStats
from pdserve.engine.request import DecodeRequest, Reservation, StepDelta
from pdserve.kv_transfer.auth import GroupAuth
from pdserve.kv_transfer.descriptor import TransferItem
from pdserve.kv_transfer.layout import blocks_for
from pdserve.kv_transfer.link import RECEIVER, KVLink
from pdserve.kv_transfer.receiver import KVReceiver, ReceivedBatch, TransferStalled

logger = logging.getLogger(__name__)

MAX_UNCLAIMED = 10_000


class DecodeWorker:
    """Ray actor (async). Construct through ``cluster``; methods are called by the router."""

    def __init__(self, config: DeploymentConfig, instance: int) -> None:
        torch.set_num_threads(config.model.num_threads)
        self.device = torch.device(config.model.device)
        self.host = resolve_host(config.model.host)
        self.kv_backend = config.kv_backend
        self.link_secret = config.link_secret
        self.engine = load_engine(config, instance, self.device)
        self._streams: dict[int, asyncio.Queue[StepDelta]] = {}
        self._attached: set[int] = set()  # a stream() call is reading the queue
        # finished before their stream() call arrived; oldest dropped beyond MAX_UNCLAIMED
        self._unclaimed: dict[int, asyncio.Queue[StepDelta]] = {}
        self._inflight: dict[str, set[int]] = defaultdict(set)  # link -> transfers mid-receive
        self._receivers: dict[str, KVReceiver] = {}
        # aborted with nothing more to come from the prefill side, but a link still writes
        # their blocks (a chunk's part need not be the prompt's last): freed once none does
        self._draining: set[int] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._step_task: asyncio.Task[None] | None = None
        self.lease_s = config.decode.kv_lease_s
        self._lease_task: asyncio.Task[None] | None = None
        self.transfers_stalled = 0  # transfers aborted because their batch stalled mid-way
        self.kv_bytes: dict[str, int] = defaultdict(int)  # received, by link backend

    def _ensure_loop(self) -> None:
        if self._step_task is None:
            self._loop = asyncio.get_running_loop()
            self._step_task = self._loop.create_task(self._step_loop())
            self._lease_task = self._loop.create_task(self._lease_loop())

    # -- links ------------------------------------------------------------------------------

    async def listen(self, name: str) -> tuple[str, int]:
        """Host link ``name``; the prefill rank joins at the returned address."""
        self._ensure_loop()
        for ended in [n for n, r in list(self._receivers.items()) if not r.alive]:
            self._receivers.pop(ended, None)  # closed by their senders
        store = KVLink.host_store(self.host)
        backend = self.kv_backend  # the two ends agree on what it means for them
        assert self._loop is not None
        loop = self._loop
        runner = self.engine.runner
        assert isinstance(runner, DecodeRunner)

        def join() -> None:
            auth = GroupAuth(self.link_secret, hosting=True)
            try:
                link = KVLink.connect(
                    name, backend, RECEIVER, self.device, self.host, store.port, store, auth=auth
                )
            except Exception as e:  # no peer proved the secret in time, no backend fits, ...
                logger.error("kv link %s not made: %s: %s", name, type(e).__name__, e)
                return
            receiver = KVReceiver(
                link,
                runner.kv_cache,
                self.engine.limits.block_size,
                lambda item: self._accept(name, item),
                lambda b: _call_soon(loop, self._on_batch, b),
                lambda n, e: _call_soon(loop, self._on_link_error, n, e),
                stall_s=self.lease_s,
            )
            self._receivers[name] = receiver
            receiver.start()

        loop.run_in_executor(None, join)
        return self.host, store.port

    async def close_links(self, names: list[str]) -> int:
        """Stop receiving on these links: their prefill instance died, and a dead sender
        cannot close its end (an idle link waits on the store, not on the peer)."""
        closing = [self._receivers.pop(n) for n in names if n in self._receivers]
        for receiver in closing:
            receiver.stop(peer_dead=True)
        return len(closing)

    def _accept(self, link: str, item: TransferItem) -> bool:
        # runs on a receiver thread: only reads the engine and adds to a set
        tid = item.transfer_id
        if not self.engine.expects_kv(tid, item.block_ids, item.first_block, item.last):
            if self.engine.knows(tid):
                logger.error("transfer %d names blocks it does not hold", tid)
            return False
        self._inflight[link].add(tid)
        return True

    def _on_batch(self, batch: ReceivedBatch) -> None:
        self.kv_bytes[batch.backend] += batch.nbytes
        per_block = batch.nbytes // max(batch.header.num_blocks, 1)  # every layer's, exact
        outputs: list[Output] = []
        for i, (item, ok) in enumerate(zip(batch.header.items, batch.accepted)):
            self._inflight[batch.link].discard(item.transfer_id)
            if not ok:
                continue
            first = batch.first_tokens[i] if batch.first_tokens is not None else None
            nbytes = per_block * blocks_for(item.num_tokens, batch.header.block_size)
            first = first if item.last else None
            outputs += self.engine.kv_landed(
                item.transfer_id, batch.header.num_heads, nbytes, batch.seconds, first,
                item.last, time.monotonic(),
            )  # fmt: skip
        self._emit(outputs + self._settle_drained())

    def _on_link_error(self, name: str, error: BaseException) -> None:
        self._receivers.pop(name, None)
        message = f"KV transfer failed on link {name}: {error}"
        tids = self._inflight.pop(name, set())
        if isinstance(error, TransferStalled):
            self.transfers_stalled += len(tids)
        outputs = [o for tid in tids for o in self.engine.kv_failed(tid, message)]
        self._emit(outputs + self._settle_drained())

    def _settle_drained(self) -> list[Output]:
        """Requests aborted with no more KV coming, once no link is still writing them."""
        done = {tid for tid in self._draining if not self._receiving(tid)}
        self._draining -= done
        return [o for tid in done for o in self.engine.abort(tid, False)]

    # -- requests ---------------------------------------------------------------------------

    async def reserve(self, req: DecodeRequest) -> tuple[Reservation | None, DecodeLoad]:
        """Reserve blocks for the prompt's KV before its prefill runs (its cached prefix
        shared); None when full."""
        self._ensure_loop()
        blocks = self.engine.reserve(req, now=time.monotonic())
        if blocks is not None:
            self._streams[req.transfer_id] = asyncio.Queue()
            if req.local_prefill:
                self._wake.set()
        return blocks, self.engine.load()

    async def abort(self, transfer_id: int, transfer_pending: bool) -> bool:
        """Forget a request and free its blocks; with KV still in flight, once it has landed."""
        if not self.engine.knows(transfer_id):
            return False
        receiving = self._receiving(transfer_id)
        if receiving and not transfer_pending:  # the part in flight is the last: free after it
            self._draining.add(transfer_id)
        self._emit(self.engine.abort(transfer_id, transfer_pending or receiving))
        return True

    def _receiving(self, transfer_id: int) -> bool:
        # list(): receiver threads may add a link entry meanwhile
        return any(transfer_id in tids for tids in list(self._inflight.values()))

    async def stream(self, transfer_id: int) -> AsyncIterator[StepDelta]:
        """Deltas of one request until it finishes; batches whatever piled up between reads."""
        queue = self._streams.get(transfer_id)
        if queue is not None:
            self._attached.add(transfer_id)
        elif (queue := self._unclaimed.pop(transfer_id, None)) is None:
            yield StepDelta(error=f"transfer {transfer_id} is unknown on this decode replica")
            return
        while True:
            delta = await queue.get()
            while not queue.empty():
                delta.merge(queue.get_nowait())
            delta.load = self.engine.load()
            yield delta
            if delta.finish_reason or delta.error:
                return

    def _emit(self, outputs: Sequence[Output]) -> None:
        """Hand the engine's outputs to their streams; a final one closes the stream."""
        for tid, delta in outputs:
            queue = self._streams.get(tid)
            if queue is None:
                continue
            queue.put_nowait(delta)
            if delta.finish_reason or delta.error:
                del self._streams[tid]
                if tid not in self._attached:  # the router's stream call may still be coming
                    self._unclaimed[tid] = queue
                    while len(self._unclaimed) > MAX_UNCLAIMED:
                        self._unclaimed.pop(next(iter(self._unclaimed)))
                self._attached.discard(tid)
        if self.engine.has_work:
            self._wake.set()

    # -- status -----------------------------------------------------------------------------

    async def node_id(self) -> str:
        """The Ray node this worker runs on (placement checks, status)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    async def get_load(self) -> DecodeLoad:
        return self.engine.load()

    async def stats(self) -> DecodeStats:
        e = self.engine
        return DecodeStats(
            e.load(),
            e.scheduler.num_reserved,
            e.num_preemptions,
            tuple(sorted(n for n, r in self._receivers.items() if r.alive)),
            e.prefills.num_partial,
            e.blocks.num_cached_blocks,
            e.prefix.queries,
            e.prefix.hits,
            e.leases_expired,
            self.transfers_stalled,
            e.spec_counters.as_dict() if e.spec is not None else {},
            dict(self.kv_bytes),
        )

    async def check_integrity(self) -> int:
        """Raise if any block is lost or double-owned; returns the number of known requests."""
        return self.engine.check_integrity()

    # -- the step loop ----------------------------------------------------------------------

    async def _step_loop(self) -> None:
        while True:
            try:
                await self._one_step()
            except Exception as e:  # a bug outside the forward: fail what is held, keep serving
                logger.exception("decode step loop error")
                self._emit(self.engine.fail_held(f"decode step failed: {type(e).__name__}: {e}"))
            await asyncio.sleep(0)  # let reserve/abort/stream calls in between steps

    async def _lease_loop(self) -> None:
        """Free reservations whose KV stopped coming (a dead router or prefill instance)."""
        while True:
            await asyncio.sleep(min(self.lease_s / 4, 5.0))
            expired = self.engine.expire(time.monotonic(), self.lease_s, self._receiving)
            if expired:
                logger.warning("%d reservations expired (decode.kv_lease_s)", len(expired))
                self._emit(expired)

    async def _one_step(self) -> None:
        step = self.engine.plan()
        if step is None:
            self._wake.clear()
            await self._wake.wait()
            return
        batch = self.engine.prepare(step)
        runner = self.engine.runner
        assert runner is not None
        try:
            result = await asyncio.to_thread(runner.run, batch)
        except Exception as e:  # a failed step fails its requests, never the replica
            logger.exception("step failed")
            self._emit(self.engine.fail_step(step, f"step failed: {e}"))
            return
        self._emit(self.engine.commit(step, result))


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` on ``loop``'s thread (from a receiver thread)."""
    loop.call_soon_threadsafe(fn, *args)
