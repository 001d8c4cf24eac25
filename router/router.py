"""The router: reserves decode space, dispatches prefills, wires KV links, fans tokens out.

Life of a request (the transfer id is assigned here and is the only pairing key)::

    generate ─▶ pick decode + reserve blocks ─▶ ensure links ─▶ open decode stream
             ─▶ pick prefill + dispatch ─▶ first token (TTFT) ─▶ decode deltas … ─▶ finish
    abort at any point: queued prefill removed, or decode told to free once the KV has landed
    KV link failed before the first token: link forgotten, replica probed, request retried
    prefill instance died: retried on another; decode replica died: migrated (token replay)

The router speaks to workers through ``ports`` only (no Ray, no torch here); a dead worker is a
``WorkerDied`` from its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from pdserve.engine.deploy_config import DeploymentConfig
from pdserve.engine.load import DecodeLoad
from pdserve.engine.request import (
    DecodeRequest,
    PrefillItem,
    PrefillResult,
    Reservation,
    StepDelta,
)
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.errors import KVLinkError
from pdserve.router.decode_pool import DecodePool
from pdserve.router.errors import NoCapacityError, Role, WorkerDied
from pdserve.router.links import KVLinks
from pdserve.router.phase import Phase
from pdserve.router.ports import DecodePort
from pdserve.router.prefill_pool import PrefillInstance, PrefillPool
from pdserve.router.prefix_index import CacheView
from pdserve.router.retry import KV_LINK_ATTEMPTS, Retry, RetryBudget

__all__ = [
    "KV_LINK_ATTEMPTS",
    "NoCapacityError",
    "Phase",
    "PrefillInstance",
    "RequestTrace",
    "Router",
    "WorkerDied",
]

logger = logging.getLogger(__name__)


@dataclass
class RequestTrace:
    """Phase timestamps (time.perf_counter) for the metrics; filled as the request moves."""

    prefill_queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_wait_s: float = 0.0  # of prefill_s: waiting for the KV sends after the forward
    kv_bytes: int = 0
    kv_reused_bytes: int = 0  # the prompt's KV the decode replica held already (not sent)
    decode_cached_tokens: int = 0  # the prompt's tokens found in the decode replica's cache
    prefill_cached_tokens: int = 0  # of the prompt's tokens, those its prefill did not compute
    transfer_s: float = 0.0
    decode_instance: int = -1
    prefill_instance: int = -1
    migrations: int = 0  # moves to another decode replica after its replica died (token replay)
    prefill_retries: int = 0  # prefills retried on another instance after an instance died


@dataclass
class _Flight:
    """One attempt: where it is placed and how far it got (its exit reads ``phase``)."""

    req: DecodeRequest
    decode: int
    reservation: Reservation
    prefill: PrefillInstance | None
    phase: Phase
    output: list[int] = field(default_factory=list)  # tokens streamed so far


class Router:
    """Drives requests through one deployment's pools. All methods run on one event loop."""

    def __init__(
        self,
        prefill: Sequence[PrefillInstance],
        decode: Sequence[DecodePort],
        config: DeploymentConfig,
    ) -> None:
        self.prefill = list(prefill)
        self.decode = list(decode)
        self.config = config
        self._ids = itertools.count(1)
        self._links = KVLinks(self.decode, config.link_prefix)  # names unique per deployment
        self._cache = CacheView(config)  # cache_aware policies: what each instance holds
        self._prefill_pool = PrefillPool(
            self.prefill,
            config.router.prefill_policy,
            self._links.drop_prefill,
            self._cache.prefill,
            config.decode.block_size,
        )
        self._decode_pool = DecodePool(
            self.decode,
            config.router.decode_policy,
            config.decode.block_size,
            self._links.drop_decode,
            self._cache.decode,
        )
        self._phases: dict[str, Phase] = {}  # request id -> RESERVED | PREFILL | DECODE
        self.migrations = 0  # requests moved to another decode replica (token replay)
        self.prefill_retries = 0  # prefills retried on another instance

    def phase(self, request_id: str) -> Phase | None:
        """Where a request is (RESERVED, PREFILL or DECODE); None when unknown or finished."""
        return self._phases.get(request_id)

    @property
    def dead_instances(self) -> dict[str, list[int]]:
        """Instances taken out of rotation after their workers died (for status)."""
        return {
            "prefill": sorted(self._prefill_pool.dead),
            "decode": sorted(self._decode_pool.dead),
        }

    @property
    def estimated_cached_blocks(self) -> dict[str, dict[int, int]]:
        """Blocks the router believes each instance caches (pools with a cache_aware policy)."""
        return self._cache.estimates(len(self.prefill), len(self.decode))

    async def start(self) -> None:
        await self._decode_pool.start()

    # -- self-healing: the controller puts fresh workers in place of dead ones --------------

    def worker_died(self, role: Role, index: int) -> None:
        """A health check found a worker of instance ``index`` gone: out of rotation."""
        if role == "decode":
            self._decode_pool.mark_dead(index)
        else:
            self._prefill_pool.mark_dead(next(p for p in self.prefill if p.index == index))

    def replace_decode(self, d: int, port: DecodePort, load: DecodeLoad) -> None:
        """A fresh replica (its first load) serves as replica ``d``; links to it come lazily."""
        self.decode[d] = port
        self._links.replace_decode(d, port)
        self._decode_pool.replace(d, port, load)

    def replace_prefill(self, fresh: PrefillInstance) -> None:
        """A fresh TP group serves as instance ``fresh.index``; its links come lazily."""
        pos = next(i for i, p in enumerate(self.prefill) if p.index == fresh.index)
        self.prefill[pos] = fresh
        self._links.drop_prefill(fresh.index)
        self._prefill_pool.replace(fresh)

    # -- the request path -------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt: Sequence[int],
        sampling: SamplingParams,
        trace: RequestTrace | None = None,
    ) -> AsyncGenerator[StepDelta, None]:
        """Yields the first token, then decode's deltas until one carries a finish or error.

        Disaggregated: the first token comes from the prefill instance (TTFT does not wait for
        the KV transfer tail). Colocated (no prefill pool): the instance prefills locally and its
        stream carries the first token too. A worker's death is retried (``router.retry``): a
        KV link failed before anything was yielded, a prefill instance died (another takes the
        prompt), or the decode replica died (token replay: the prompt plus every token yielded
        so far is prefilled again for a live replica, and the stream goes on from the next
        token, the same tokens a run without the fault gives).
        """
        trace = trace or RequestTrace()
        budget = RetryBudget(self.config.router)
        streamed: list[int] = []  # yielded so far, over every attempt
        while True:
            replay = (*prompt, *streamed)
            try:
                async with contextlib.aclosing(
                    self._attempt(request_id, replay, len(streamed), sampling, trace)
                ) as deltas:
                    async for delta in deltas:
                        streamed += delta.token_ids
                        yield delta
                return
            except Retry as retry:
                budget.spend(retry, request_id)  # raises past the limit
                if retry.kind == "decode":
                    trace.migrations += 1
                    self.migrations += 1
                elif retry.kind == "prefill":
                    trace.prefill_retries += 1
                    self.prefill_retries += 1
                logger.warning(
                    "request %s: %s; retrying it (%s, %d tokens streamed)",
                    request_id, retry.error, retry.kind, len(streamed),
                )  # fmt: skip

    async def _attempt(
        self,
        request_id: str,
        prompt: Sequence[int],
        replayed: int,
        sampling: SamplingParams,
        trace: RequestTrace,
    ) -> AsyncGenerator[StepDelta, None]:
        """One placement of the request; ``prompt``'s last ``replayed`` tokens are outputs."""
        flight = await self._place(request_id, prompt, replayed, sampling, trace)
        try:
            links = await self._ensure_links(flight)
            stream = self.decode[flight.decode].stream(flight.req.transfer_id)
            async with contextlib.aclosing(stream):
                if flight.prefill is not None:
                    first = await self._run_prefill(flight, links, trace)
                    flight.output += first.token_ids
                    yield first
                try:
                    async for delta in stream:
                        self._observe(flight, delta, trace)
                        yield delta
                        if flight.phase is Phase.DONE:
                            return
                except WorkerDied as e:
                    if e.role != "decode":
                        raise
                    self._decode_pool.mark_dead(flight.decode)
                    raise Retry("decode", e) from e
        finally:
            self._phases.pop(request_id, None)
            if flight.phase is not Phase.DONE:
                await asyncio.shield(self._abort(flight))
            else:
                self._cache.answered(flight.decode, flight.req.prompt_token_ids, flight.output)
            await self._decode_pool.released()

    async def _place(
        self,
        request_id: str,
        prompt: Sequence[int],
        replayed: int,
        sampling: SamplingParams,
        trace: RequestTrace,
    ) -> _Flight:
        """Reserve decode blocks, then pick the prefill instance (none when colocated)."""
        colocated = not self.prefill
        tid = next(self._ids)
        req = DecodeRequest(tid, request_id, tuple(prompt), sampling, colocated, replayed)
        if not colocated:
            self._prefill_pool.check_alive()
        hashes = self._cache.hashes(req.prompt_token_ids)
        d, reservation = await self._decode_pool.reserve(req, hashes)
        try:
            p = None if colocated else self._prefill_pool.pick(hashes)
        except NoCapacityError:  # the last one died while we waited for blocks
            await asyncio.shield(self.decode[d].abort(req.transfer_id, False))
            raise
        trace.decode_instance = d
        trace.decode_cached_tokens = reservation.cached_blocks * self.config.decode.block_size
        # colocated, the replica prefills only past its cached blocks; a prefill instance says
        # what its own prefix cache held in its result
        trace.prefill_cached_tokens = trace.decode_cached_tokens if colocated else 0
        if p is not None:
            trace.prefill_instance = p.index
        phase = Phase.DECODE if colocated else Phase.RESERVED
        flight = _Flight(req, d, reservation, p, phase)
        self._phases[request_id] = flight.phase
        return flight

    async def _ensure_links(self, flight: _Flight) -> asyncio.Task[None] | None:
        """The links from the flight's prefill instance to its replica (None when colocated)."""
        p, d = flight.prefill, flight.decode
        if p is None:
            return None
        try:
            return await self._links.ensure(p, d)
        except WorkerDied as e:
            if e.role == "decode":  # it died under our reservation: retry elsewhere
                self._decode_pool.mark_dead(d)
                why = f"decode replica {d} died before its KV link was made"
                raise Retry("link", KVLinkError(d, why)) from e
            self._prefill_pool.mark_dead(p)
            raise Retry("prefill", e) from e

    async def _run_prefill(
        self, flight: _Flight, links: asyncio.Task[None] | None, trace: RequestTrace
    ) -> StepDelta:
        """Dispatch the prompt; its first token once the KV has left."""
        p, req = flight.prefill, flight.req
        assert p is not None and links is not None
        item = PrefillItem(
            req.transfer_id,
            req.request_id,
            req.prompt_token_ids,
            req.sampling,
            flight.decode,
            flight.reservation.block_ids,
            flight.reservation.cached_blocks,  # its prefill sends only the blocks after these
            req.num_replayed,
        )
        flight.phase = self._phases[req.request_id] = Phase.PREFILL
        try:
            result = await self._prefill(p, item)
        except Exception as e:
            # the prefill side failed (its batch raised, or a rank died): it sends nothing
            # more, and a batch that died half-sent dropped its links
            flight.phase = Phase.PREFILL_FAILED
            if isinstance(e, WorkerDied):  # another instance takes it, on a fresh reservation
                self._prefill_pool.mark_dead(p)
                raise Retry("prefill", e) from e
            self._links.forget(p, flight.decode, links)
            await self._decode_pool.probe(flight.decode)
            if isinstance(e, KVLinkError):
                raise Retry("link", e) from e
            raise
        flight.phase = self._phases[req.request_id] = Phase.DECODE
        trace.prefill_queue_s, trace.prefill_s = result.queue_s, result.compute_s
        trace.kv_wait_s = result.kv_wait_s
        trace.prefill_cached_tokens = result.cached_tokens
        return StepDelta([result.first_token], [result.logprobs])

    async def _prefill(self, p: PrefillInstance, item: PrefillItem) -> PrefillResult:
        n = len(item.prompt_token_ids)
        p.queued_tokens += n
        p.queued_requests += 1
        try:
            return await p.leader.prefill(item)
        finally:
            p.queued_tokens -= n
            p.queued_requests -= 1

    def _observe(self, flight: _Flight, delta: StepDelta, trace: RequestTrace) -> None:
        if delta.load is not None:
            self._decode_pool.observe(flight.decode, delta.load)
        flight.output += delta.token_ids
        trace.kv_bytes += delta.kv_bytes
        trace.kv_reused_bytes += delta.kv_reused_bytes
        trace.transfer_s += delta.transfer_s
        if delta.finish_reason or delta.error:
            flight.phase = Phase.DONE  # decode has let go of it

    async def _abort(self, flight: _Flight) -> None:
        """Free the request on both sides; decode keeps blocks whose KV may still arrive."""
        tid, d, p = flight.req.transfer_id, flight.decode, flight.prefill
        pending = False
        if flight.phase is Phase.PREFILL and p is not None:
            try:
                pending = not await p.leader.abort(tid)
            except WorkerDied:
                pending = False  # a dead prefill sends nothing more
        try:
            await self.decode[d].abort(tid, pending)
        except WorkerDied:
            logger.warning("decode replica %d died holding transfer %d", d, tid)
