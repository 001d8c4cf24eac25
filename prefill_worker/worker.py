"""The prefill actor: one per TP rank; rank 0 (the leader) queues, batches and drives the rest.

router --prefill(item)--> leader queue --take_batch--> execute(batch) on every rank at once
                                                        |  forward + all-reduces (TP group)
                                                        |  KV slices -> decode, layer by layer
router <--PrefillResult-- leader <----- first tokens ---+
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine.batching import take_batch
from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import DeploymentConfig, resolve_host
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup, make_process_group
from pdserve.engine.request import PrefillItem, PrefillResult
from pdserve.kv_transfer.link import SENDER, KVLink, KVLinkError, resolve_backend
from pdserve.prefill_worker.runner import PrefillRunner

logger = logging.getLogger(__name__)


@dataclass
class _Queued:
    item: PrefillItem
    future: asyncio.Future[PrefillResult]
    enqueued: float


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
        self._queue: deque[_Queued] = deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._executing = False  # a batch is running on this rank
        self._retired: list[KVLink] = []  # links replaced mid-batch, aborted after it

    # -- start-up ---------------------------------------------------------------------------

    async def tp_address(self) -> tuple[str, int]:
        """Leader: host the TP group's rendezvous store; every rank joins it in ``start``."""
        self._tp_store = KVLink.host_store(self.host)
        return self.host, self._tp_store.port

    async def start(self, tp_host: str, tp_port: int, peers: Sequence[Any] = ()) -> None:
        """Join the TP group, load this rank's shard; the leader also starts its batch loop."""
        await asyncio.to_thread(self._start, tp_host, tp_port)
        if self.rank == 0:
            self._peers = list(peers)
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    def _start(self, host: str, port: int) -> None:
        tp = TPGroup.single()
        if self.pool.tensor_parallel_size > 1:
            store = self._tp_store or torch.distributed.TCPStore(host, port, 2, False)
            self._tp_store = store
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            pg = make_process_group(
                backend,
                torch.distributed.PrefixStore("tp", store),
                self.rank,
                self.pool.tensor_parallel_size,
            )
            tp = TPGroup(self.rank, self.pool.tensor_parallel_size, pg)
        model = load_model(self.config, tp, self.device)
        decode = self.deployment.decode  # the KV travels in the decode cache's layout and format
        self._runner = PrefillRunner(
            model, tp, self.device, decode.block_size, decode.kv_cache.dtype
        )
        logger.info("prefill instance %d rank %d ready", self.instance, self.rank)

    async def connect_link(self, decode_instance: int, name: str, host: str, port: int) -> bool:
        """Join the link a decode replica is hosting; False when this rank sends no KV."""
        assert self._runner is not None, "start() first"
        if not self._runner.sends_kv:
            return False
        backend = resolve_backend(self.deployment.kv_backend, self.device)
        link = await asyncio.to_thread(
            KVLink.connect, name, backend, SENDER, self.device, host, port
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
        """Queue one prompt; resolves once its batch ran and its KV has left."""
        future: asyncio.Future[PrefillResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(item, future, time.perf_counter()))
        self._wake.set()
        return await future

    async def abort(self, transfer_id: int) -> bool:
        """Drop a still-queued prompt. False when it is already running (its KV will be sent)."""
        for queued in self._queue:
            if queued.item.transfer_id == transfer_id:
                self._queue.remove(queued)
                queued.future.cancel()
                return True
        return False

    async def queued_tokens(self) -> int:
        return sum(len(q.item.prompt_token_ids) for q in self._queue)

    async def _batch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                n = take_batch(
                    [len(q.item.prompt_token_ids) for q in self._queue],
                    self.pool.max_batch_tokens,
                    self.pool.max_batch_size,
                )
                batch = [self._queue.popleft() for _ in range(n)]
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Queued]) -> None:
        items = [q.item for q in batch]
        start = time.perf_counter()
        try:
            calls = [peer.execute.remote(items) for peer in self._peers]
            (out, broken, kv_wait_s), *rest = await asyncio.gather(self.execute(items), *calls)
        except Exception as e:  # a failed batch fails its requests, not the instance
            logger.exception("prefill batch of %d failed", len(items))
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(e)
            return
        compute_s = time.perf_counter() - start
        assert out is not None
        for _, more, rank_wait_s in rest:  # a link may fail on any KV-sending rank
            for dest, why in more.items():
                broken.setdefault(dest, why)
            kv_wait_s = max(kv_wait_s, rank_wait_s)
        for why in broken.values():
            logger.error("prefill instance %d: %s", self.instance, why)
        for i, q in enumerate(batch):
            if q.future.done():
                continue
            dest = q.item.decode_instance
            if dest in broken:
                q.future.set_exception(KVLinkError(dest, broken[dest]))
                continue
            q.future.set_result(
                PrefillResult(
                    q.item.transfer_id,
                    out.token_ids[i],
                    out.logprobs[i],
                    start - q.enqueued,
                    compute_s,
                    kv_wait_s=kv_wait_s,
                )
            )

    # -- every rank -------------------------------------------------------------------------

    async def execute(self, items: list[PrefillItem]) -> tuple[Any, dict[int, str], float]:
        """Run one batch on this rank (the leader calls it on all ranks at once); returns the
        first tokens (leader), the destinations whose link failed, and the seconds this rank
        waited, after its forward pass, for its KV sends to leave."""
        assert self._runner is not None, "start() first"
        links = dict(self._links)  # this batch's links, whatever connect_link does meanwhile
        waited_before = sum(link.flush_wait_s for link in links.values())
        self._executing = True
        try:
            out, broken = await asyncio.to_thread(self._runner.run, items, links)
        except Exception:
            # A batch that died half-sent leaves its links out of step: drop them so the router
            # rebuilds them, and the decode side fails only the transfers that were in flight.
            self._drop_links(links, {it.decode_instance for it in items})
            raise
        finally:
            self._executing = False
            retired, self._retired = self._retired, []
            for link in retired:
                link.abort()
        self._drop_links(links, broken)
        return out, broken, sum(link.flush_wait_s for link in links.values()) - waited_before

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
