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

This file is the actor's surface and one rank's step; the rank's start-up (TP group, cache
size) is ``startup.py``'s, its KV links ``links.py``'s, the leader's queue and step loop
``leader.py``'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import DeploymentConfig, resolve_host
from pdserve.engine.load import PrefillStats
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup
from pdserve.engine.request import PrefillItem, PrefillResult
from pdserve.kv_transfer.auth import bound_store
from pdserve.prefill_worker.leader import PrefillLeader, StepAnswer
from pdserve.prefill_worker.links import RankLinks
from pdserve.prefill_worker.runner import PrefillRunner
from pdserve.prefill_worker.scheduler import PrefillWork
from pdserve.prefill_worker.startup import (
    TP_JOIN_S,
    join_tp_group,
    leader_scheduler,
    num_cache_blocks,
)

logger = logging.getLogger(__name__)


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
        self._links = RankLinks(config, self.device)
        self._leader: PrefillLeader | None = None  # rank 0 only
        self._loop_task: asyncio.Task[None] | None = None

    # -- start-up ---------------------------------------------------------------------------

    async def tp_address(self) -> tuple[str, int]:
        """Leader: host the TP group's rendezvous store; every rank joins it in ``start``."""
        self._tp_store = bound_store(self.host, self.pool.tensor_parallel_size, TP_JOIN_S)
        return self.host, self._tp_store.port

    async def start(self, tp_host: str, tp_port: int, peers: Sequence[Any] = ()) -> None:
        """Join the TP group, load this rank's shard; the leader also starts its batch loop."""
        await asyncio.to_thread(self._start, tp_host, tp_port)
        if self.rank == 0:
            assert self._leader is not None
            self._leader.peers = list(peers)
            self._loop_task = asyncio.get_running_loop().create_task(self._leader.run())

    def _start(self, host: str, port: int) -> None:
        tp = TPGroup.single()
        if self.pool.tensor_parallel_size > 1:
            store = self._tp_store or torch.distributed.TCPStore(host, port, 2, False)
            self._tp_store = store
            tp = join_tp_group(self.deployment, store, self.rank, self.device)
        model = load_model(self.config, tp, self.device)
        decode = self.deployment.decode  # the KV travels in the decode cache's layout and format
        num_blocks = num_cache_blocks(self.deployment, self.config, tp, self.device)
        self._runner = PrefillRunner(
            model, tp, self.device, decode.block_size, decode.kv_cache.dtype, num_blocks
        )
        if tp.rank == 0:
            sched = leader_scheduler(self.deployment, num_blocks)
            self._leader = PrefillLeader(sched, self.execute, self.instance)
        logger.info(
            "prefill instance %d rank %d ready: %d KV blocks", self.instance, self.rank, num_blocks
        )

    async def connect_link(self, decode_instance: int, name: str, host: str, port: int) -> bool:
        """Join the link a decode replica is hosting; False when this rank sends no KV."""
        assert self._runner is not None, "start() first"
        if not self._runner.sends_kv:
            return False
        await self._links.connect(decode_instance, name, host, port)
        return True

    # -- serving (leader: ``leader.py``) ----------------------------------------------------

    async def prefill(self, item: PrefillItem) -> PrefillResult:
        """Queue one prompt; resolves once its last step ran and all its KV has left."""
        assert self._leader is not None, "prefill goes to the leader, after start()"
        return await self._leader.prefill(item)

    async def abort(self, transfer_id: int) -> bool:
        """Drop a prompt; True when nothing more of its KV will be sent (its earlier chunks'
        parts have left), False when the step that ends it is running (its KV will be sent)
        or it is unknown. A prompt in the running step is dropped right after it."""
        if self._leader is None:
            return False
        return await self._leader.abort(transfer_id)

    async def queued_tokens(self) -> int:
        """Prompt tokens waiting to be computed (the running step's are not waiting)."""
        return self._leader.queued_tokens if self._leader is not None else 0

    async def stats(self) -> PrefillStats:
        assert self._leader is not None, "stats come from the leader, after start()"
        s = self._leader.sched
        return PrefillStats(
            s.queued_tokens, len(s), s.num_partial, await self.cache_blocks(),
            s.blocks.num_cached_blocks, s.queries, s.hits,
        )  # fmt: skip

    async def cache_blocks(self) -> int:
        """Blocks this instance's prefix cache can hold (0: prefix caching off)."""
        s = self._leader.sched if self._leader is not None else None
        return s.blocks.num_blocks if s is not None and s.blocks.caching else 0

    async def check_integrity(self) -> int:
        """Raise if a cache block is lost or held by no prompt; returns the prompts held."""
        return self._leader.sched.check_integrity() if self._leader is not None else 0

    # -- every rank -------------------------------------------------------------------------

    async def execute(self, works: list[PrefillWork]) -> StepAnswer:
        """Run one step on this rank (the leader calls it on all ranks at once); returns the
        first tokens of the prompts it completed (leader), the destinations whose link failed,
        and the seconds this rank waited, after its forward pass, for its KV sends to leave."""
        assert self._runner is not None, "start() first"
        if self._links.executing:  # never two steps' sends on one link (see leader.py)
            raise RuntimeError(f"prefill rank {self.rank} is still running a step")
        links = self._links.snapshot()  # this step's links, whatever connect_link does meanwhile
        waited_before = sum(link.flush_wait_s for link in links.values())
        self._links.executing = True
        try:
            firsts, broken = await asyncio.to_thread(self._runner.run_step, works, links)
        except Exception:
            # A step that died half-sent leaves its links out of step: drop them so the router
            # rebuilds them, and the decode side fails only the transfers that were in flight.
            self._links.drop_used(links, {w.item.decode_instance for w in works})
            raise
        finally:
            self._links.end_step()
        self._links.drop_used(links, broken)
        return firsts, broken, sum(link.flush_wait_s for link in links.values()) - waited_before

    async def drop_link(self, decode_instance: int) -> bool:
        """Abort this rank's KV link to a decode replica (after the running step): the
        prompts bound there fail and the router makes a new link for the next request (a stuck
        link's remedy; the tests' way to break a link mid-prompt). False when there is none."""
        return self._links.drop(decode_instance)

    async def node_id(self) -> str:
        """The Ray node this worker runs on (placement checks, status)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    async def ready(self) -> bool:
        return self._runner is not None
