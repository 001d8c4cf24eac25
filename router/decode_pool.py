"""The decode pool as the router sees it: ports, their last load snapshots, the dead replicas,
and reservations that wait (boundedly) for space and never leak."""

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
    ) -> None:
        self.ports = list(ports)
        self.policy = policy
        self.block_size = block_size
        self.dead: set[int] = set()  # replicas whose worker died
        self.loads: list[DecodeLoad] = []
        self._on_dead = on_dead
        self._turn = itertools.count()  # its own round-robin position (not the prefill pool's)
        self._capacity = asyncio.Condition()
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.loads = list(await asyncio.gather(*(port.load() for port in self.ports)))

    def observe(self, d: int, load: DecodeLoad) -> None:
        self.loads[d] = load

    def mark_dead(self, d: int) -> None:
        """A dead replica takes its links with it; the rest of the pool serves on."""
        if d not in self.dead:
            logger.error("decode replica %d is dead; routing around it", d)
            self.dead.add(d)
            self._on_dead(d)

    async def probe(self, d: int) -> None:
        """Mark ``d`` dead unless it still answers."""
        try:
            self.loads[d] = await self.ports[d].load()
        except WorkerDied:
            self.mark_dead(d)

    async def released(self) -> None:
        """A request let go of its blocks: wake the reservations waiting for space."""
        async with self._capacity:
            self._capacity.notify_all()

    async def reserve(self, req: DecodeRequest) -> tuple[int, Reservation]:
        """Blocks on some replica; waits while all are full (never when impossible)."""
        needed = -(-len(req.prompt_token_ids) // self.block_size)
        if all(needed > load.total_blocks for load in self.loads):
            raise NoCapacityError(
                f"a prompt of {len(req.prompt_token_ids)} tokens needs {needed} KV blocks; the "
                f"largest decode replica has {max(x.total_blocks for x in self.loads)}: "
                "give decode a larger KV cache or send a shorter prompt"
            )
        while True:
            placed = await self._try_each(req, needed)
            if placed is not None:
                return placed
            if len(self.dead) == len(self.ports):
                raise NoCapacityError("no decode replica is alive: redeploy (pdserve down/up)")
            async with self._capacity:  # a finishing request frees blocks and wakes us
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._capacity.wait(), timeout=CAPACITY_WAIT_S)
            await self._refresh()

    async def _try_each(self, req: DecodeRequest, needed: int) -> tuple[int, Reservation] | None:
        """Reserve on the replicas the policy picks, in turn, until one has room."""
        tried: set[int] = set(self.dead)
        while len(tried) < len(self.ports):
            loads = [x for x in self.loads if x.instance not in tried]
            d = pick_decode(self.policy, loads, needed, next(self._turn))
            if d is None:
                return None
            try:
                blocks, load = await self._reserve_on(d, req)
            except WorkerDied:
                self.mark_dead(d)
                tried.add(d)
                continue
            self.loads[d] = load
            if blocks is not None:
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
                self.loads[i] = load

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
