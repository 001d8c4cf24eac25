"""The prefill actor: one per TP rank; rank 0 (the leader) queues, batches and drives the rest.

router --prefill(item)--> leader: PrefillScheduler --schedule--> execute(works) on every rank
                          (queue, cache blocks,                   |  forward over the rank's
                           chunks, prefix cache)                  |  paged cache (TP group)
                                                                  |  KV blocks -> decode
router <--PrefillResult-- leader <------ first tokens (last chunk) +

Each rank holds a paged KV cache of its head slice (``prefill.kv_cache``); the leader's
`PrefillScheduler` decides every block table and broadcasts them with the step, so the ranks'
caches stay alike. A prompt computes only past its cached prefix; a long one (chunked prefill)
runs over several steps, its KV sent to decode part by part.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import DeploymentConfig, resolve_host
from pdserve.engine.kv_cache import bytes_per_block
from pdserve.engine.load import PrefillStats
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup
from pdserve.engine.prefix_hash import hash_salt
from pdserve.engine.request import PrefillItem, PrefillResult
from pdserve.kv_transfer.auth import GroupAuth, bound_store, join_group
from pdserve.kv_transfer.link import SENDER, KVLink, KVLinkError, resolve_backend
from pdserve.prefill_worker.runner import PrefillRunner
from pdserve.prefill_worker.scheduler import PrefillScheduler, PrefillWork

logger = logging.getLogger(__name__)

ABORT_WAIT_S = 600.0  # the longest an abort waits for the step running its prompt
TP_JOIN_S = 300.0  # the longest the TP group's ranks wait for one another (store, handshake)


@dataclass
class _Queued:
    item: PrefillItem
    future: asyncio.Future[PrefillResult]
    enqueued: float
    started: float = 0.0  # its first step began
    kv_wait_s: float = 0.0  # summed over its steps
    dropped: asyncio.Future[bool] | None = None  # aborted during a step: the abort's answer


class PrefillWorker:
    """Ray actor (async). Construct through ``cluster``; methods are called by the router."""

    def __init__(self, config: DeploymentConfig, instance: int, rank: int) -> None:
        assert config.prefill is not None, "a colocated deployment has no prefill pool"
        m = config.model
        torch.set_num_threads(m.num_threads)
        self.deployment = config
        self.pool = config.prefill
        self.instance, self.rank = instance, rank
        self.device = torch.device(m.device)
        self.host = resolve_host(m.host)
        self.config = ModelConfig.of(m)
        self._tp_store: torch.distributed.TCPStore | None = None
        self._runner: PrefillRunner | None = None
        self._links: dict[int, KVLink] = {}
        self._peers: list[Any] = []  # follower actor handles (leader only)
        self._sched: PrefillScheduler | None = None  # leader only
        self._waiting: dict[int, _Queued] = {}  # leader: prompts held, by transfer id
        self._in_step: set[int] = set()  # leader: the running step's prompts
        self._step: list[PrefillWork] = []  # leader: the running step
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._executing = False  # a batch is running on this rank
        self._retired: list[KVLink] = []  # links replaced mid-batch, aborted after it
        self._dead_peer: BaseException | None = None  # leader: a follower's death, once seen

    # -- start-up ---------------------------------------------------------------------------

    async def tp_address(self) -> tuple[str, int]:
        """Leader: host the TP group's rendezvous store; every rank joins it in ``start``."""
        self._tp_store = bound_store(self.host, self.pool.tensor_parallel_size, TP_JOIN_S)
        return self.host, self._tp_store.port

    async def start(self, tp_host: str, tp_port: int, peers: Sequence[Any] = ()) -> None:
        """Join the TP group, load this rank's shard; the leader also starts its batch loop."""
        await asyncio.to_thread(self._start, tp_host, tp_port)
        if self.rank == 0:
            self._peers = list(peers)
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    def _start(self, host: str, port: int) -> None:
        tp = TPGroup.single()
        size = self.pool.tensor_parallel_size
        if size > 1:
            store = self._tp_store or torch.distributed.TCPStore(host, port, 2, False)
            self._tp_store = store
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            # only holders of the deployment's secret join (kv_transfer.auth)
            auth = GroupAuth(self.deployment.link_secret, hosting=self.rank == 0, peers=size - 1)
            pg = join_group(store, auth, "tp", backend, self.rank, size, self.device, TP_JOIN_S)
            tp = TPGroup(self.rank, size, pg)
        model = load_model(self.config, tp, self.device)
        decode = self.deployment.decode  # the KV travels in the decode cache's layout and format
        num_blocks = self._num_blocks(tp)
        self._runner = PrefillRunner(
            model, tp, self.device, decode.block_size, decode.kv_cache.dtype, num_blocks
        )
        if tp.rank == 0:
            self._sched = PrefillScheduler(
                num_blocks,
                decode.block_size,
                self.pool.max_batch_tokens,
                self.pool.max_batch_size,
                chunked=self.pool.chunked_prefill,
                caching=self.deployment.prefix_caching,
                salt=hash_salt(
                    self.deployment.model.path, decode.kv_cache.dtype, decode.block_size
                ),
            )
        logger.info(
            "prefill instance %d rank %d ready: %d KV blocks", self.instance, self.rank, num_blocks
        )

    def _num_blocks(self, tp: TPGroup) -> int:
        """This rank's cache blocks: ``prefill.kv_cache`` of its head slice, the smallest
        count over the TP group (every rank holds the same block ids)."""
        d = self.deployment.decode
        per_block = bytes_per_block(self.config, tp.size, d.block_size, d.kv_cache.dtype)
        memory = torch.cuda.mem_get_info(self.device) if self.device.type == "cuda" else None
        n = self.pool.kv_cache.num_blocks(per_block, memory, "prefill.kv_cache")
        if tp.size > 1:
            assert tp.pg is not None
            count = torch.tensor([n], dtype=torch.int64, device=self.device)
            opts = torch.distributed.AllreduceOptions()
            opts.reduceOp = torch.distributed.ReduceOp.MIN  # type: ignore[assignment]
            tp.pg.allreduce([count], opts).wait()
            n = int(count.item())
        if n < 1:
            raise ValueError(f"prefill.kv_cache holds no block of {per_block} bytes: raise it")
        return n

    async def connect_link(self, decode_instance: int, name: str, host: str, port: int) -> bool:
        """Join the link a decode replica is hosting; False when this rank sends no KV."""
        assert self._runner is not None, "start() first"
        if not self._runner.sends_kv:
            return False
        backend = resolve_backend(self.deployment.kv_backend, self.device)
        auth = GroupAuth(self.deployment.link_secret, hosting=False)
        link = await asyncio.to_thread(
            KVLink.connect, name, backend, SENDER, self.device, host, port, auth=auth
        )
        old = self._links.get(decode_instance)
        self._links[decode_instance] = link
        if old is not None:  # the router replaced it: abort it so its decode receiver stops,
            if self._executing:  # after the batch that may still be sending on it
                self._retired.append(old)
            else:
                old.abort()
        return True

    # -- serving (leader) -------------------------------------------------------------------

    async def prefill(self, item: PrefillItem) -> PrefillResult:
        """Queue one prompt; resolves once its last step ran and all its KV has left."""
        assert self._sched is not None, "prefill goes to the leader, after start()"
        if self._dead_peer is not None:  # a rank of this group died: it runs no step again
            raise self._dead_peer
        self._sched.add(item)  # ValueError: it could never fit this instance's cache
        future: asyncio.Future[PrefillResult] = asyncio.get_running_loop().create_future()
        self._waiting[item.transfer_id] = _Queued(item, future, time.perf_counter())
        self._wake.set()
        return await future

    async def abort(self, transfer_id: int) -> bool:
        """Drop a prompt; True when nothing more of its KV will be sent (its earlier chunks'
        parts have left), False when the step that ends it is running (its KV will be sent)
        or it is unknown. A prompt in the running step is dropped right after it."""
        q = self._waiting.get(transfer_id)
        if q is None:
            return False
        if transfer_id not in self._in_step:
            self._forget(transfer_id, None)
            return True
        if q.dropped is None:
            q.dropped = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(q.dropped), ABORT_WAIT_S)
        except TimeoutError:
            return False

    async def queued_tokens(self) -> int:
        """Prompt tokens waiting to be computed (the running step's are not waiting)."""
        if self._sched is None:
            return 0
        return self._sched.queued_tokens - sum(w.num_tokens for w in self._step)

    async def stats(self) -> PrefillStats:
        s = self._sched
        assert s is not None, "stats come from the leader, after start()"
        return PrefillStats(
            s.queued_tokens, len(s), s.num_partial, await self.cache_blocks(),
            s.blocks.num_cached_blocks, s.queries, s.hits,
        )  # fmt: skip

    async def cache_blocks(self) -> int:
        """Blocks this instance's prefix cache can hold (0: prefix caching off)."""
        s = self._sched
        return s.blocks.num_blocks if s is not None and s.blocks.caching else 0

    async def check_integrity(self) -> int:
        """Raise if a cache block is lost or held by no prompt; returns the prompts held."""
        return self._sched.check_integrity() if self._sched is not None else 0

    async def _batch_loop(self) -> None:
        assert self._sched is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while works := self._sched.schedule():
                await self._run_step(works)

    async def _run_step(self, works: list[PrefillWork]) -> None:
        assert self._sched is not None
        start = time.perf_counter()
        for w in works:
            q = self._waiting[w.item.transfer_id]
            q.started = q.started or start
        self._in_step, self._step = {w.item.transfer_id for w in works}, works
        try:
            # every rank's answer, this rank's included, before anything else: a step that
            # returned early (a peer's call failed) while this rank still sends would let the
            # next step's sends interleave with its own on a link, and a decode receiver handed
            # a misframed stream is aborted by gloo
            calls = [peer.execute.remote(works) for peer in self._peers]
            answers = await asyncio.gather(self.execute(works), *calls, return_exceptions=True)
        finally:
            self._in_step, self._step = set(), []
        errors = [a for a in answers if isinstance(a, BaseException)]
        if errors:
            self._step_failed(works, errors)
            return
        (firsts, broken, kv_wait_s), *rest = answers  # type: ignore[misc]
        for _, more, rank_wait_s in rest:  # a link may fail on any KV-sending rank
            for dest, why in more.items():
                broken.setdefault(dest, why)
            kv_wait_s = max(kv_wait_s, rank_wait_s)
        for dest, why in broken.items():
            logger.error("prefill instance %d: %s", self.instance, why)
            for tid in self._sched.tids([dest]):  # nothing more reaches it on this link
                self._forget(tid, KVLinkError(dest, why))
        for w in works:
            if (held := self._waiting.get(w.item.transfer_id)) is not None:
                held.kv_wait_s += kv_wait_s
        done = self._sched.on_step_done(works)
        for tid, cached in done.items():
            self._finish(tid, firsts[tid], cached)
        for w in works:  # aborted during the step: dropped now, before the next one forms
            aborted = self._waiting.get(w.item.transfer_id)
            if aborted is not None and aborted.dropped is not None:
                self._forget(w.item.transfer_id, None)

    def _step_failed(self, works: list[PrefillWork], errors: list[BaseException]) -> None:
        """A failed step fails its prompts and those bound to its destinations (their links
        were dropped), not the instance; a dead rank fails the instance: every prompt held
        gets its death (the router retries them elsewhere), and so does every later one."""
        assert self._sched is not None
        died = next((e for e in errors if _is_death(e)), None)
        error = died or errors[0]
        logger.error("prefill step of %d prompts failed: %s", len(works), error)
        if died is not None:
            self._dead_peer = died
            failed = set(self._waiting)
        else:
            dests = {w.item.decode_instance for w in works}
            failed = {w.item.transfer_id for w in works} | set(self._sched.tids(dests))
        for tid in failed:
            self._forget(tid, error)

    def _finish(self, tid: int, first: tuple[int, Any], cached: int) -> None:
        q = self._waiting.pop(tid)
        if q.dropped is not None and not q.dropped.done():
            q.dropped.set_result(False)  # its KV is all sent: decode frees once it lands
        if q.future.done():
            return
        end, begun = time.perf_counter(), q.started or q.enqueued
        token, logprobs = first
        result = PrefillResult(
            tid, token, logprobs, begun - q.enqueued, end - begun,
            kv_wait_s=q.kv_wait_s, cached_tokens=cached,
        )  # fmt: skip
        q.future.set_result(result)

    def _forget(self, tid: int, error: BaseException | None) -> None:
        """Drop a prompt here, releasing its cache blocks once: its caller hears ``error``
        (None: it was aborted)."""
        assert self._sched is not None
        self._sched.remove(tid)
        q = self._waiting.pop(tid, None)
        if q is None:
            return
        if q.dropped is not None and not q.dropped.done():
            q.dropped.set_result(True)
        if not q.future.done():
            if error is None:
                q.future.cancel()
            else:
                q.future.set_exception(error)

    # -- every rank -------------------------------------------------------------------------

    async def execute(
        self, works: list[PrefillWork]
    ) -> tuple[dict[int, tuple[int, Any]], dict[int, str], float]:
        """Run one step on this rank (the leader calls it on all ranks at once); returns the
        first tokens of the prompts it completed (leader), the destinations whose link failed,
        and the seconds this rank waited, after its forward pass, for its KV sends to leave."""
        assert self._runner is not None, "start() first"
        if self._executing:  # never two steps' sends on one link (see _run_step)
            raise RuntimeError(f"prefill rank {self.rank} is still running a step")
        links = dict(self._links)  # this step's links, whatever connect_link does meanwhile
        waited_before = sum(link.flush_wait_s for link in links.values())
        self._executing = True
        try:
            firsts, broken = await asyncio.to_thread(self._runner.run_step, works, links)
        except Exception:
            # A step that died half-sent leaves its links out of step: drop them so the router
            # rebuilds them, and the decode side fails only the transfers that were in flight.
            self._drop_links(links, {w.item.decode_instance for w in works})
            raise
        finally:
            self._executing = False
            retired, self._retired = self._retired, []
            for link in retired:
                link.abort()
        self._drop_links(links, broken)
        return firsts, broken, sum(link.flush_wait_s for link in links.values()) - waited_before

    async def drop_link(self, decode_instance: int) -> bool:
        """Abort this rank's KV link to a decode replica (after the running step): the
        prompts bound there fail and the router makes a new link for the next request (a stuck
        link's remedy; the tests' way to break a link mid-prompt). False when there is none."""
        link = self._links.pop(decode_instance, None)
        if link is None:
            return False
        if self._executing:
            self._retired.append(link)
        else:
            link.abort()
        return True

    def _drop_links(self, used: Mapping[int, KVLink], dests: Iterable[int]) -> None:
        """Abort the links a batch used to ``dests`` (not ones made since to replace them)."""
        for dest in dests:
            if dest not in used:
                continue
            link = used[dest]
            if self._links.get(dest) is link:
                del self._links[dest]
            link.abort()

    async def node_id(self) -> str:
        """The Ray node this worker runs on (placement checks, status)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    async def ready(self) -> bool:
        return self._runner is not None


def _is_death(error: BaseException) -> bool:
    """A peer rank's process is gone (Ray's actor-death error, as a call to it raises)."""
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError)
