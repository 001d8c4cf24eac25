"""The KV links the router has asked for: one per (prefill instance, decode replica) pair, each
joining every KV-sending rank of the instance to the replica; made once, lazily, and shared by
the requests that need it while it is being made."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence

from pdserve.router.ports import DecodePort
from pdserve.router.prefill_pool import PrefillInstance

logger = logging.getLogger(__name__)


class KVLinks:
    """Link-making tasks by (prefill instance, decode replica). A failed or forgotten link is
    made again under a new name (names carry a generation, so a late error from the old link
    never touches the new one)."""

    def __init__(self, decode: Sequence[DecodePort], prefix: str) -> None:
        self.decode = list(decode)
        self.prefix = prefix  # unique per deployment: link names never collide
        self._tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._generation = itertools.count()

    async def ensure(self, p: PrefillInstance, d: int) -> asyncio.Task[None]:
        """Make the links from ``p`` to replica ``d`` unless made; returns the task that made
        them (``forget`` compares it). Raises what making them raised (``WorkerDied`` of the
        replica or of a prefill rank)."""
        key = (p.index, d)
        task = self._tasks.get(key)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.get_running_loop().create_task(self._connect(p, d))
            self._tasks[key] = task
        await asyncio.shield(task)  # a caller that goes away leaves it to the others
        return task

    def forget(self, p: PrefillInstance, d: int, task: asyncio.Task[None]) -> None:
        """The prefill side dropped its link to ``d``: the next request makes a new one (unless
        another failure already replaced ``task``)."""
        if self._tasks.get((p.index, d)) is task:
            del self._tasks[(p.index, d)]

    def drop_prefill(self, index: int) -> None:
        for key in [k for k in self._tasks if k[0] == index]:
            del self._tasks[key]

    def drop_decode(self, d: int) -> None:
        for key in [k for k in self._tasks if k[1] == d]:
            del self._tasks[key]

    def replace_decode(self, d: int, port: DecodePort) -> None:
        """Replica ``d`` was replaced: links to it are made afresh, on the new port."""
        self.decode[d] = port
        self.drop_decode(d)

    async def _connect(self, p: PrefillInstance, d: int) -> None:
        generation = next(self._generation)  # a rebuilt link never reuses a name

        async def one(rank: int) -> None:
            name = f"{self.prefix}/p{p.index}r{rank}-d{d}.{generation}"
            host, port = await self.decode[d].listen(name)
            await p.ranks[rank].connect_link(d, name, host, port)

        await asyncio.gather(*(one(r) for r in p.senders))
        logger.info("kv links prefill %d -> decode %d up", p.index, d)
