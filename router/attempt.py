"""One attempt of a request: placed on a decode replica (and a prefill instance), linked,
streamed, prefilled; its exit frees what it holds by how far it got (``Phase``).

``Router.generate`` runs attempts until one finishes or the retry budget is spent; an attempt
that a worker's death or a failed KV link cut short raises ``Retry`` (``router.retry``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from pdserve.engine.deploy_config import DeploymentConfig
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
from pdserve.router.errors import NoCapacityError, WorkerDied
from pdserve.router.links import KVLinks
from pdserve.router.phase import Phase
from pdserve.router.ports import DecodePort
from pdserve.router.prefill_pool import PrefillInstance, PrefillPool
from pdserve.router.prefix_index import CacheView
from pdserve.router.retry import Retry
from pdserve.router.trace import RequestTrace

logger = logging.getLogger(__name__)


@dataclass
class Flight:
    """One attempt: where it is placed and how far it got (its exit reads ``phase``)."""

    req: DecodeRequest
    decode: int
    reservation: Reservation
    prefill: PrefillInstance | None
    phase: Phase
    output: list[int] = field(default_factory=list)  # tokens streamed so far


class Attempts:
    """Runs attempts over the router's pools; shares its worker lists and its phase table."""

    def __init__(
        self,
        prefill: list[PrefillInstance],
        decode: list[DecodePort],
        config: DeploymentConfig,
        links: KVLinks,
        cache: CacheView,
        pools: tuple[PrefillPool, DecodePool],
        phases: dict[str, Phase],
    ) -> None:
        self.prefill = prefill  # the router's lists: replacing a worker there replaces it here
        self.decode = decode
        self.config = config
        self._ids = itertools.count(1)  # transfer ids: the only key pairing the two sides
        self._links = links
        self._cache = cache
        self._prefill_pool, self._decode_pool = pools
        self._phases = phases  # request id -> RESERVED | PREFILL | DECODE

    async def run(
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
    ) -> Flight:
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
        flight = Flight(req, d, reservation, p, phase)
        self._phases[request_id] = flight.phase
        return flight

    async def _ensure_links(self, flight: Flight) -> asyncio.Task[None] | None:
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
        self, flight: Flight, links: asyncio.Task[None] | None, trace: RequestTrace
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

    def _observe(self, flight: Flight, delta: StepDelta, trace: RequestTrace) -> None:
        if delta.load is not None:
            self._decode_pool.observe(flight.decode, delta.load)
        flight.output += delta.token_ids
        trace.kv_bytes += delta.kv_bytes
        trace.kv_reused_bytes += delta.kv_reused_bytes
        trace.transfer_s += delta.transfer_s
        if delta.finish_reason or delta.error:
            flight.phase = Phase.DONE  # decode has let go of it

    async def _abort(self, flight: Flight) -> None:
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
