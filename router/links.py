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

CLOSE_S = 10.0  # the longest a decode replica is waited on to close a dead instance's links


class KVLinks:
    """Link-making tasks by (prefill instance, decode replica). A failed or forgotten link is
    made again under a new name (names carry a generation, so a late error from the old link
    never touches the new one)."""

    def __init__(self, decode: Sequence[DecodePort], prefix: str) -> None:
        self.decode = list(decode)
        self.prefix = prefix  # unique per deployment: link names never collide
        self._tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._names: dict[tuple[int, int], list[str]] = {}  # the links each task made
        self._closing: set[asyncio.Task[None]] = set()
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
            self._names.pop((p.index, d), None)  # the prefill side closed them itself

    def drop_prefill(self, index: int) -> None:
        """Prefill instance ``index`` died: its links are forgotten, and their decode ends are
        told to stop waiting on them (a dead sender cannot say so itself; see KVLink)."""
        for key in [k for k in self._tasks if k[0] == index]:
            del self._tasks[key]
            names = self._names.pop(key, [])
            if names:
                task = asyncio.get_running_loop().create_task(self._close(key[1], names))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _close(self, d: int, names: list[str]) -> None:
        try:
            await asyncio.wait_for(self.decode[d].close_links(names), CLOSE_S)
        except Exception as e:  # best effort: a dead or slow replica has other troubles
            logger.info("decode %d did not close links %s: %s", d, names, e)

    def drop_decode(self, d: int) -> None:
        for key in [k for k in self._tasks if k[1] == d]:
            del self._tasks[key]
            self._names.pop(key, None)

    def replace_decode(self, d: int, port: DecodePort) -> None:
        """Replica ``d`` was replaced: links to it are made afresh, on the new port."""
        self.decode[d] = port
        self.drop_decode(d)

    async def _connect(self, p: PrefillInstance, d: int) -> None:
        generation = next(self._generation)  # a rebuilt link never reuses a name
        names = self._names[(p.index, d)] = []

        async def one(rank: int) -> None:
            name = f"{self.prefix}/p{p.index}r{rank}-d{d}.{generation}"
            names.append(name)
            host, port = await self.decode[d].listen(name)
            await p.ranks[rank].connect_link(d, name, host, port)

        await asyncio.gather(*(one(r) for r in p.senders))
        logger.info("kv links prefill %d -> decode %d up", p.index, d)
