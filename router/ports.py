"""What the router needs of its workers: typed ports, and the one error a dead worker raises.

The router never sees an actor handle. ``pdserve.cluster.launch.ray_ports`` implements these ports over
Ray (and turns Ray's actor-death errors into ``WorkerDied``); the unit tests implement them with
in-process fakes over the real block accounting.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from pdserve.engine.load import DecodeLoad
from pdserve.engine.request import (
    DecodeRequest,
    PrefillItem,
    PrefillResult,
    Reservation,
    StepDelta,
)
from pdserve.router.errors import WorkerDied as WorkerDied  # part of the contract


class DecodePort(Protocol):
    """One decode replica. Every method may raise ``WorkerDied``."""

    async def reserve(self, req: DecodeRequest) -> tuple[Reservation | None, DecodeLoad]:
        """Hold blocks for the prompt's KV before its prefill runs: the block ids and how many
        leading ones already hold it (None when full), and the replica's load after the call."""
        ...

    async def abort(self, transfer_id: int, transfer_pending: bool) -> bool:
        """Forget a request and free its blocks; with ``transfer_pending`` (its KV may still be
        on its way) only once it has landed. False when the replica does not know it."""
        ...

    def stream(self, transfer_id: int) -> AsyncGenerator[StepDelta, None]:
        """Open the request's delta stream now (the call is made before this returns); the
        deltas end with one carrying a finish reason or an error."""
        ...

    async def listen(self, name: str) -> tuple[str, int]:
        """Host KV link ``name``; the prefill rank joins at the returned (host, port)."""
        ...

    async def close_links(self, names: list[str]) -> int:
        """Stop receiving on these links (their prefill instance died); how many it had."""
        ...

    async def load(self) -> DecodeLoad:
        """The replica's current load (also proves it alive)."""
        ...


class PrefillPort(Protocol):
    """One rank of a prefill instance; ``prefill`` and ``abort`` go to the leader (rank 0).
    Every method may raise ``WorkerDied``."""

    async def prefill(self, item: PrefillItem) -> PrefillResult:
        """Queue one prompt; resolves once its batch ran and its KV has left. Raises
        ``KVLinkError`` when the link to the item's decode replica failed."""
        ...

    async def abort(self, transfer_id: int) -> bool:
        """Drop a still-queued prompt. False when it already runs (its KV will be sent)."""
        ...

    async def connect_link(self, decode_instance: int, name: str, host: str, port: int) -> bool:
        """Join the link a decode replica hosts; False when this rank sends no KV."""
        ...

    async def kill(self) -> None:
        """End this rank's process (its instance is out: a rank of its TP group died). Never
        raises for a worker already gone."""
        ...
