"""A fake prefill rank (a `PrefillPort`) that lands its KV on a `FakeDecode`; see `_fake_worker`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from _fake_decode import FIRST_TOKEN, FakeDecode
from _fake_worker import FakeWorker, gate

from pdserve.engine.request import PrefillItem, PrefillResult
from pdserve.kv_transfer.errors import KVLinkError
from pdserve.router.errors import WorkerDied


@dataclass
class _Queued:
    item: PrefillItem
    task: asyncio.Task[Any]


class FakePrefill(FakeWorker):
    """A `PrefillPort` (one rank). Gates: `connecting` (joining a link), `running` (a queued
    prompt starts), `sending` (its KV is on its way to decode). `break_links` fails every send."""

    def __init__(self, instance: int, decodes: Sequence[FakeDecode], rank: int = 0) -> None:
        super().__init__("prefill", instance)
        self.rank = rank
        self.decodes = list(decodes)
        self.connecting, self.running, self.sending = gate(), gate(), gate()
        self.break_links = False
        self.links: dict[int, str] = {}  # decode instance -> link name
        self.queue: list[_Queued] = []
        self.transferring: set[int] = set()
        self.items: list[PrefillItem] = []  # every item dispatched here

    async def connect_link(self, decode_instance: int, name: str, host: str, port: int) -> bool:
        self.calls.append(("connect_link", decode_instance, name))
        return await self._call(self._connect(decode_instance, name))

    async def prefill(self, item: PrefillItem) -> PrefillResult:
        self.calls.append(("prefill", item.transfer_id))
        self.items.append(item)
        return await self._call(self._prefill(item))

    async def abort(self, transfer_id: int) -> bool:
        self.calls.append(("abort", transfer_id))
        self._alive()
        for queued in self.queue:
            if queued.item.transfer_id == transfer_id:
                self.queue.remove(queued)
                queued.task.cancel()
                return True
        return False

    async def kill(self) -> None:
        self.calls.append(("kill",))
        self.die()

    async def _connect(self, d: int, name: str) -> bool:
        await self._until(self.connecting.wait())
        self.links[d] = name
        return True

    async def _prefill(self, item: PrefillItem) -> PrefillResult:
        task = asyncio.current_task()
        assert task is not None
        queued = _Queued(item, task)
        self.queue.append(queued)
        await self._until(self.running.wait())
        self.queue.remove(queued)
        tid, decode = item.transfer_id, self.decodes[item.decode_instance]
        decode.begin_transfer(tid)
        self.transferring.add(tid)
        try:
            await self._until(self.sending.wait())
        except WorkerDied:  # the sender is gone: its link breaks mid-transfer
            decode.fail_transfer(tid, f"link from prefill {self.instance} broke")
            raise
        finally:
            self.transferring.discard(tid)
        if decode.dead or self.break_links or item.decode_instance not in self.links:
            why = f"KV link to decode replica {item.decode_instance} failed"
            self.links.pop(item.decode_instance, None)  # a failed link is dropped
            decode.fail_transfer(tid, why)
            raise KVLinkError(item.decode_instance, why)
        # a replayed request's next token: the fake decode's made-up token at that output index
        first = item.num_replayed or FIRST_TOKEN
        decode.land(tid, first)
        return PrefillResult(tid, first, None, queue_s=0.0, compute_s=0.0)
