"""The router's worker ports over Ray actors: every ``.remote()`` the router makes goes through
here, and here alone Ray's errors become the router's.

Mapping: ``ray.exceptions.RayActorError`` (``ActorDiedError``: the process is gone;
``ActorUnavailableError``: it cannot be reached; and a ``RayTaskError`` whose cause is one,
as when a prefill leader's call to a dead TP peer fails) -> ``WorkerDied`` naming the worker.
A ``KVLinkError`` raised inside a prefill actor arrives as Ray's ``RayTaskError`` subclass of it
and leaves as a plain ``KVLinkError`` with the cause's replica and message. Anything else passes
through unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from pdserve.engine.load import DecodeLoad
from pdserve.engine.request import (
    DecodeRequest,
    PrefillItem,
    PrefillResult,
    Reservation,
    StepDelta,
)
from pdserve.kv_transfer.errors import KVLinkError
from pdserve.router.errors import Role, WorkerDied


@contextmanager
def _deaths(role: Role, instance: int, rank: int | None = None) -> Iterator[None]:
    """Ray's actor-death errors, as ``WorkerDied`` of this worker."""
    try:
        yield
    except RayActorError as e:
        raise WorkerDied(role, instance, rank, type(e).__name__) from e


class RayDecodePort:
    """``DecodePort`` over one ``DecodeWorker`` actor."""

    def __init__(self, handle: Any, instance: int) -> None:
        self.handle = handle
        self.instance = instance

    async def reserve(self, req: DecodeRequest) -> tuple[Reservation | None, DecodeLoad]:
        with _deaths("decode", self.instance):
            result: tuple[Reservation | None, DecodeLoad] = await self.handle.reserve.remote(req)
        return result

    async def abort(self, transfer_id: int, transfer_pending: bool) -> bool:
        with _deaths("decode", self.instance):
            return bool(await self.handle.abort.remote(transfer_id, transfer_pending))

    def stream(self, transfer_id: int) -> AsyncGenerator[StepDelta, None]:
        with _deaths("decode", self.instance):
            refs = self.handle.stream.remote(transfer_id)  # sent now, not at the first read
        return self._deltas(refs)

    async def _deltas(self, refs: Any) -> AsyncGenerator[StepDelta, None]:
        # refs: Ray's streaming generator, one ObjectRef per delta
        with _deaths("decode", self.instance):
            async for ref in refs:
                delta: StepDelta = await ref
                yield delta

    async def listen(self, name: str) -> tuple[str, int]:
        with _deaths("decode", self.instance):
            host, port = await self.handle.listen.remote(name)
        return str(host), int(port)

    async def close_links(self, names: list[str]) -> int:
        with _deaths("decode", self.instance):
            return int(await self.handle.close_links.remote(names))

    async def load(self) -> DecodeLoad:
        with _deaths("decode", self.instance):
            load: DecodeLoad = await self.handle.get_load.remote()
        return load


class RayPrefillPort:
    """``PrefillPort`` over one ``PrefillWorker`` actor (rank ``rank`` of its TP group)."""

    def __init__(self, handle: Any, instance: int, rank: int) -> None:
        self.handle = handle
        self.instance = instance
        self.rank = rank

    async def prefill(self, item: PrefillItem) -> PrefillResult:
        with _deaths("prefill", self.instance, self.rank):
            try:
                result: PrefillResult = await self.handle.prefill.remote(item)
            except KVLinkError as e:  # Ray's wrapper: a plain one, with the cause's message
                cause = e.cause if isinstance(e, RayTaskError) else e
                raise KVLinkError(cause.decode_instance, cause.message) from e
        return result

    async def abort(self, transfer_id: int) -> bool:
        with _deaths("prefill", self.instance, self.rank):
            return bool(await self.handle.abort.remote(transfer_id))

    async def connect_link(self, decode_instance: int, name: str, host: str, port: int) -> bool:
        with _deaths("prefill", self.instance, self.rank):
            return bool(await self.handle.connect_link.remote(decode_instance, name, host, port))

    async def kill(self) -> None:
        ray.kill(self.handle, no_restart=True)  # a dead actor: a no-op
