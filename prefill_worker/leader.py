"""The prefill leader (rank 0 of an instance): its queue of prompts and its step loop.

Each prompt waits in the ``PrefillScheduler`` until a step takes it (whole, or a chunk at a
time); every step runs on all ranks at once (``PrefillWorker.execute``) and is answered by
every rank before the next forms. A step that raises fails its prompts and those bound to the
destinations whose links it dropped; a dead rank fails the instance. Every exit goes through
``_forget`` (or ``_finish``), which releases the prompt's cache blocks once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pdserve.engine.request import PrefillItem, PrefillResult
from pdserve.kv_transfer.errors import KVLinkError
from pdserve.prefill_worker.scheduler import PrefillScheduler, PrefillWork

logger = logging.getLogger(__name__)

ABORT_WAIT_S = 600.0  # the longest an abort waits for the step running its prompt

# one rank's answer to a step: first tokens (leader), broken destinations, KV wait seconds
StepAnswer = tuple[dict[int, tuple[int, Any]], dict[int, str], float]


@dataclass
class _Queued:
    item: PrefillItem
    future: asyncio.Future[PrefillResult]
    enqueued: float
    started: float = 0.0  # its first step began
    kv_wait_s: float = 0.0  # summed over its steps
    dropped: asyncio.Future[bool] | None = None  # aborted during a step: the abort's answer


class PrefillLeader:
    """The leader's prompts (by transfer id) and the loop that runs their steps on every rank."""

    def __init__(
        self,
        sched: PrefillScheduler,
        execute: Callable[[list[PrefillWork]], Coroutine[Any, Any, StepAnswer]],
        instance: int,
    ) -> None:
        self.sched = sched
        self.peers: list[Any] = []  # the followers' actor handles, set at start
        self.instance = instance
        self._execute = execute  # this rank's own step
        self._waiting: dict[int, _Queued] = {}  # prompts held, by transfer id
        self._in_step: set[int] = set()  # the running step's prompts
        self._step: list[PrefillWork] = []  # the running step
        self._wake = asyncio.Event()
        self.dead_peer: BaseException | None = None  # a follower's death, once seen

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens waiting to be computed (the running step's are not waiting)."""
        return self.sched.queued_tokens - sum(w.num_tokens for w in self._step)

    async def prefill(self, item: PrefillItem) -> PrefillResult:
        """Queue one prompt; resolves once its last step ran and all its KV has left."""
        if self.dead_peer is not None:  # a rank of this group died: it runs no step again
            raise self.dead_peer
        self.sched.add(item)  # ValueError: it could never fit this instance's cache
        future: asyncio.Future[PrefillResult] = asyncio.get_running_loop().create_future()
        self._waiting[item.transfer_id] = _Queued(item, future, time.perf_counter())
        self._wake.set()
        return await future

    async def abort(self, transfer_id: int) -> bool:
        """Drop a prompt; True when nothing more of its KV will be sent (its earlier chunks'
        parts have left), False when the step that ends it is running (its KV will be sent)
        or it is unknown. A prompt in the running step is dropped right after it."""
        q = self._waiting.get(transfer_id)
        if q is None:
            return False
        if transfer_id not in self._in_step:
            self._forget(transfer_id, None)
            return True
        if q.dropped is None:
            q.dropped = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(q.dropped), ABORT_WAIT_S)
        except TimeoutError:
            return False

    async def run(self) -> None:
        """The batch loop: form a step whenever prompts wait, run it on every rank."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while works := self.sched.schedule():
                await self._run_step(works)

    async def _run_step(self, works: list[PrefillWork]) -> None:
        start = time.perf_counter()
        for w in works:
            q = self._waiting[w.item.transfer_id]
            q.started = q.started or start
        self._in_step, self._step = {w.item.transfer_id for w in works}, works
        try:
            # every rank's answer, this rank's included, before anything else: a step that
            # returned early (a peer's call failed) while this rank still sends would let the
            # next step's sends interleave with its own on a link, and a decode receiver handed
            # a misframed stream is aborted by gloo
            calls = [peer.execute.remote(works) for peer in self.peers]
            answers = await asyncio.gather(self._execute(works), *calls, return_exceptions=True)
        finally:
            self._in_step, self._step = set(), []
        errors = [a for a in answers if isinstance(a, BaseException)]
        if errors:
            self._step_failed(works, errors)
            return
        (firsts, broken, kv_wait_s), *rest = answers  # type: ignore[misc]
        for _, more, rank_wait_s in rest:  # a link may fail on any KV-sending rank
            for dest, why in more.items():
                broken.setdefault(dest, why)
            kv_wait_s = max(kv_wait_s, rank_wait_s)
        for dest, why in broken.items():
            logger.error("prefill instance %d: %s", self.instance, why)
            for tid in self.sched.tids([dest]):  # nothing more reaches it on this link
                self._forget(tid, KVLinkError(dest, why))
        for w in works:
            if (held := self._waiting.get(w.item.transfer_id)) is not None:
                held.kv_wait_s += kv_wait_s
        done = self.sched.on_step_done(works)
        for tid, cached in done.items():
            self._finish(tid, firsts[tid], cached)
        for w in works:  # aborted during the step: dropped now, before the next one forms
            aborted = self._waiting.get(w.item.transfer_id)
            if aborted is not None and aborted.dropped is not None:
                self._forget(w.item.transfer_id, None)

    def _step_failed(self, works: list[PrefillWork], errors: list[BaseException]) -> None:
        """A failed step fails its prompts and those bound to its destinations (their links
        were dropped), not the instance; a dead rank fails the instance: every prompt held
        gets its death (the router retries them elsewhere), and so does every later one."""
        died = next((e for e in errors if _is_death(e)), None)
        error = died or errors[0]
        logger.error("prefill step of %d prompts failed: %s", len(works), error)
        if died is not None:
            self.dead_peer = died
            failed = set(self._waiting)
        else:
            dests = {w.item.decode_instance for w in works}
            failed = {w.item.transfer_id for w in works} | set(self.sched.tids(dests))
        for tid in failed:
            self._forget(tid, error)

    def _finish(self, tid: int, first: tuple[int, Any], cached: int) -> None:
        q = self._waiting.pop(tid)
        if q.dropped is not None and not q.dropped.done():
            q.dropped.set_result(False)  # its KV is all sent: decode frees once it lands
        if q.future.done():
            return
        end, begun = time.perf_counter(), q.started or q.enqueued
        token, logprobs = first
        result = PrefillResult(
            tid, token, logprobs, begun - q.enqueued, end - begun,
            kv_wait_s=q.kv_wait_s, cached_tokens=cached,
        )  # fmt: skip
        q.future.set_result(result)

    def _forget(self, tid: int, error: BaseException | None) -> None:
        """Drop a prompt here, releasing its cache blocks once: its caller hears ``error``
        (None: it was aborted)."""
        self.sched.remove(tid)
        q = self._waiting.pop(tid, None)
        if q is None:
            return
        if q.dropped is not None and not q.dropped.done():
            q.dropped.set_result(True)
        if not q.future.done():
            if error is None:
                q.future.cancel()
            else:
                q.future.set_exception(error)


def _is_death(error: BaseException) -> bool:
    """A peer rank's process is gone (Ray's actor-death error, as a call to it raises)."""
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError)
