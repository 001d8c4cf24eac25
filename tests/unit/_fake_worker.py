"""What the in-process fake workers share: each call runs as its own task, as an actor call
does (a caller that goes away does not stop it); gates (`asyncio.Event`, open by default) hold
a phase so a test can act inside it; `die()` makes every pending and later call raise
`WorkerDied`.

`FakeDecode` (`_fake_decode`) keeps its blocks in the real `DecodeScheduler` and `BlockManager`,
so a leaked reservation or a skipped abort shows in `check_integrity()` and the free-block
count; `FakePrefill` (`_fake_prefill`) "prefills" by telling its destination `FakeDecode` that
the KV landed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from pdserve.router.errors import Role, WorkerDied

T = TypeVar("T")


def gate() -> asyncio.Event:
    e = asyncio.Event()
    e.set()
    return e


class FakeWorker:
    """Base of the fakes: liveness, the call log, calls run as tasks, waits that death ends."""

    def __init__(self, role: Role, instance: int) -> None:
        self.role: Role = role
        self.instance = instance
        self.dead = False
        self.calls: list[tuple[Any, ...]] = []  # (method, args...) in arrival order
        self._died = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    def die(self) -> None:
        self.dead = True
        self._died.set()

    def _alive(self) -> None:
        if self.dead:
            raise WorkerDied(self.role, self.instance)

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` as an actor call: a cancelled caller leaves it running."""
        task = self._spawn(coro)
        return await asyncio.shield(task)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nobody may await it
        return task

    async def _until(self, aw: Awaitable[T]) -> T:
        """``aw``'s result, or WorkerDied if this worker is (or dies) first."""
        work, died = asyncio.ensure_future(aw), asyncio.ensure_future(self._died.wait())
        try:
            await asyncio.wait({work, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
            if not work.done():
                work.cancel()
        self._alive()
        return work.result()
