"""The decode pool as the router sees it: ports, their last load snapshots, the dead replicas,
reservations that wait (boundedly) for space and never leak, and (policy `cache_aware`) the
router's index of what each replica's prefix cache holds."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence

from pdserve.engine.load import DecodeLoad
from pdserve.engine.request import DecodeRequest, Reservation
from pdserve.router.errors import NoCapacityError, WorkerDied
from pdserve.router.policies import pick_decode
from pdserve.router.ports import DecodePort
from pdserve.router.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)

CAPACITY_WAIT_S = 1.0  # longest wait for a finishing request before loads are asked afresh


class DecodePool:
    """Reserves a prompt's blocks on a replica picked by policy over load snapshots (piggybacked
    on decode replies, refreshed while waiting). A replica whose port raises ``WorkerDied`` is
    marked dead and routed around."""

    def __init__(
        self,
        ports: Sequence[DecodePort],
        policy: str,
        block_size: int,
        on_dead: Callable[[int], None],
        index: PrefixIndex | None = None,
    ) -> None:
        self.ports = list(ports)
        self.policy = policy
        self.block_size = block_size
        self.index = index  # policy cache_aware: what each replica's prefix cache likely holds
        self.dead: set[int] = set()  # replicas whose worker died
        self.loads: list[DecodeLoad] = []
        self._on_dead = on_dead
        self._turn = itertools.count()  # its own round-robin position (not the prefill pool's)
        self._capacity = asyncio.Condition()
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.loads = list(await asyncio.gather(*(port.load() for port in self.ports)))
        for d, load in enumerate(self.loads):
            self.observe(d, load)

    def observe(self, d: int, load: DecodeLoad) -> None:
        self.loads[d] = load
        if self.index is not None:
            self.index.resize(d, load.total_blocks)

    def mark_dead(self, d: int) -> None:
        """A dead replica takes its links with it; the rest of the pool serves on."""
        if d not in self.dead:
            logger.error("decode replica %d is dead; routing around it", d)
            self.dead.add(d)
            if self.index is not None:
                self.index.forget(d)
            self._on_dead(d)

    def replace(self, d: int, port: DecodePort, load: DecodeLoad) -> None:
        """Put a fresh replica (its first ``load``) in place of dead replica ``d``
        (self-healing): back in rotation with nothing believed cached."""
        self.ports[d] = port
        if self.index is not None:
            self.index.forget(d)
        self.observe(d, load)
        self.dead.discard(d)
        logger.info("decode replica %d replaced; back in rotation", d)

    async def probe(self, d: int) -> None:
        """Mark ``d`` dead unless it still answers."""
        try:
            self.observe(d, await self.ports[d].load())
        except WorkerDied:
            self.mark_dead(d)

    async def released(self) -> None:
        """A request let go of its blocks: wake the reservations waiting for space."""
        async with self._capacity:
            self._capacity.notify_all()

    async def reserve(
        self, req: DecodeRequest, hashes: Sequence[int] = ()
    ) -> tuple[int, Reservation]:
        """Blocks on some replica; waits while all are full (never when impossible). `hashes`:
        the prompt's full blocks' (`cache_aware` looks them up in the index)."""
        needed = -(-len(req.prompt_token_ids) // self.block_size)
        if all(needed > load.total_blocks for load in self.loads):
            raise NoCapacityError(
                f"a prompt of {len(req.prompt_token_ids)} tokens needs {needed} KV blocks; the "
                f"largest decode replica has {max(x.total_blocks for x in self.loads)}: "
                "give decode a larger KV cache or send a shorter prompt"
            )
        while True:
            placed = await self._try_each(req, needed, hashes)
            if placed is not None:
                return placed
            if len(self.dead) == len(self.ports):
                raise NoCapacityError("no decode replica is alive: redeploy (pdserve down/up)")
            async with self._capacity:  # a finishing request frees blocks and wakes us
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._capacity.wait(), timeout=CAPACITY_WAIT_S)
            await self._refresh()

    async def _try_each(
        self, req: DecodeRequest, needed: int, hashes: Sequence[int]
    ) -> tuple[int, Reservation] | None:
        """Reserve on the replicas the policy picks, in turn, until one has room."""
        tried: set[int] = set(self.dead)
        lookup = _lookup(req, hashes, self.block_size)
        while len(tried) < len(self.ports):
            loads = [x for x in self.loads if x.instance not in tried]
            hits = None
            if self.index is not None:
                hits = self.index.matches((x.instance for x in loads), lookup)
            d = pick_decode(self.policy, loads, needed, next(self._turn), hits)
            if d is None:
                return None
            try:
                blocks, load = await self._reserve_on(d, req)
            except WorkerDied:
                self.mark_dead(d)
                tried.add(d)
                continue
            self.observe(d, load)
            if blocks is not None:
                if self.index is not None:
                    self.index.correct(d, lookup, blocks.cached_blocks)
                    self.index.insert(d, hashes)  # cached there once its KV has landed
                return d, blocks
            tried.add(d)
        return None

    async def _refresh(self) -> None:
        alive = [i for i in range(len(self.ports)) if i not in self.dead]
        fresh = await asyncio.gather(*(self.ports[i].load() for i in alive), return_exceptions=True)
        for i, load in zip(alive, fresh):
            if isinstance(load, WorkerDied):
                self.mark_dead(i)
            elif isinstance(load, BaseException):
                raise load
            else:
                self.observe(i, load)

    async def _reserve_on(
        self, d: int, req: DecodeRequest
    ) -> tuple[Reservation | None, DecodeLoad]:
        """One reserve call that cannot leak: if the caller goes away while it is in flight,
        whatever it reserved is released as soon as it answers."""
        call = asyncio.ensure_future(self.ports[d].reserve(req))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            task = asyncio.get_running_loop().create_task(
                self._release_late(call, d, req.transfer_id)
            )
            self._background.add(task)  # keep a reference until it is done
            task.add_done_callback(self._background.discard)
            raise

    async def _release_late(
        self, call: asyncio.Future[tuple[Reservation | None, DecodeLoad]], d: int, tid: int
    ) -> None:
        try:
            blocks, _ = await call
            if blocks is not None:
                await self.ports[d].abort(tid, False)
        except WorkerDied:  # a dead replica holds nothing
            logger.warning("decode replica %d died while transfer %d was reserved", d, tid)


def _lookup(req: DecodeRequest, hashes: Sequence[int], block_size: int) -> Sequence[int]:
    """The hashes a replica looks up: a colocated prompt's stop a token short, since its own
    prefill must compute the last position (`decode_worker.prefix_cache`)."""
    if req.local_prefill:
        return hashes[: (len(req.prompt_token_ids) - 1) // block_size]
    return hashes
