"""The router: reserves decode space, dispatches prefills, wires KV links, fans tokens out.

Life of a request (the transfer id is assigned here and is the only pairing key)::

    generate ─▶ pick decode + reserve blocks ─▶ ensure links ─▶ open decode stream
             ─▶ pick prefill + dispatch ─▶ first token (TTFT) ─▶ decode deltas … ─▶ finish
    abort at any point: queued prefill removed, or decode told to free once the KV has landed
    KV link failed before the first token: link forgotten, replica probed, request retried
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from pdserve.engine.load import DecodeLoad, PrefillLoad
from pdserve.engine.request import DecodeRequest, PrefillItem, PrefillResult, StepDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.link import KVLinkError
from pdserve.router.policies import pick_decode, pick_prefill

logger = logging.getLogger(__name__)


KV_LINK_ATTEMPTS = 3  # tries of a request whose KV link failed before it yielded anything


class NoCapacityError(RuntimeError):
    """No decode replica can ever hold this prompt's KV."""


class _DecodeDied(Exception):
    """Internal: decode replica ``d`` died while a link to it was being made."""

    def __init__(self, d: int) -> None:
        super().__init__(f"decode replica {d} died")


class _LinkFailed(Exception):
    """Internal: an attempt failed on its KV link before yielding; ``generate`` retries it."""

    def __init__(self, error: KVLinkError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class RouterConfig:
    prefill_policy: str = "least_loaded"
    decode_policy: str = "most_free_blocks"
    block_size: int = 16
    link_prefix: str = "pdserve"  # unique per deployment: link names never collide


@dataclass
class PrefillInstance:
    """A TP group: ``ranks[0]`` is the leader; ``senders`` are the ranks that send KV."""

    index: int
    ranks: list[Any]
    senders: list[int]
    queued_tokens: int = 0
    queued_requests: int = 0

    @property
    def leader(self) -> Any:
        return self.ranks[0]


@dataclass
class RequestTrace:
    """Phase timestamps (time.perf_counter) for the metrics; filled as the request moves."""

    prefill_queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_wait_s: float = 0.0  # of prefill_s: waiting for the KV sends after the forward
    kv_bytes: int = 0
    transfer_s: float = 0.0
    decode_instance: int = -1
    prefill_instance: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


class Router:
    """Drives requests through one deployment's pools. All methods run on one event loop."""

    def __init__(
        self, prefill: Sequence[PrefillInstance], decode: Sequence[Any], config: RouterConfig
    ) -> None:
        self.prefill = list(prefill)
        self.decode = list(decode)
        self.config = config
        self._ids = itertools.count(1)
        # one round-robin position per pool: a shared one would alias with two picks a request
        self._prefill_turn = itertools.count()
        self._decode_turn = itertools.count()
        self._loads: list[DecodeLoad] = []
        self._links: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._link_generation = itertools.count()
        self._capacity = asyncio.Condition()
        self._background: set[asyncio.Task[None]] = set()
        self._dead: set[int] = set()  # decode replicas whose actor died
        self._dead_prefill: set[int] = set()  # prefill instances with a dead rank
        self._phases: dict[str, str] = {}  # request id -> reserved | prefill | decode

    def phase(self, request_id: str) -> str | None:
        """Where a request is: ``reserved`` (decode blocks held, prefill not dispatched yet),
        ``prefill`` (queued, computing or sending its KV), ``decode``; None when unknown."""
        return self._phases.get(request_id)

    async def start(self) -> None:
        self._loads = list(await asyncio.gather(*(d.get_load.remote() for d in self.decode)))

    # -- the request path -------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt: Sequence[int],
        sampling: SamplingParams,
        trace: RequestTrace | None = None,
    ) -> AsyncIterator[StepDelta]:
        """Yields the first token, then decode's deltas until one carries a finish or error.

        Disaggregated: the first token comes from the prefill instance (TTFT does not wait for
        the KV transfer tail). Colocated (no prefill pool): the instance prefills locally and its
        stream carries the first token too. A request whose KV link failed before it yielded
        anything (its decode replica died mid-transfer) is retried from the start on a fresh
        reservation, up to ``KV_LINK_ATTEMPTS`` times in all.
        """
        trace = trace or RequestTrace()
        for attempt in range(1, KV_LINK_ATTEMPTS + 1):
            try:
                async with contextlib.aclosing(
                    self._attempt(request_id, prompt, sampling, trace)
                ) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            except _LinkFailed as failed:
                if attempt == KV_LINK_ATTEMPTS:
                    raise failed.error from None
                logger.warning("request %s: %s; retrying it", request_id, failed.error)

    async def _attempt(
        self,
        request_id: str,
        prompt: Sequence[int],
        sampling: SamplingParams,
        trace: RequestTrace,
    ) -> AsyncGenerator[StepDelta, None]:
        tid = next(self._ids)
        colocated = not self.prefill
        req = DecodeRequest(tid, request_id, tuple(prompt), sampling, local_prefill=colocated)
        if not colocated and len(self._dead_prefill) == len(self.prefill):
            raise NoCapacityError("no prefill instance is alive: redeploy (pdserve down/up)")
        d, blocks = await self._reserve(req)
        try:
            p = None if colocated else self._pick_prefill()
        except NoCapacityError:  # the last one died while we waited for blocks
            await self.decode[d].abort.remote(tid, False)
            raise
        trace.decode_instance = d
        phase = "decode" if colocated else "reserved"
        self._phases[request_id] = phase
        try:
            if p is not None:
                trace.prefill_instance = p.index
                try:
                    links = await self._ensure_links(p, d)
                except _DecodeDied as e:  # it died under our reservation: retry elsewhere
                    self._mark_decode_dead(d)
                    why = f"decode replica {d} died before its KV link was made"
                    raise _LinkFailed(KVLinkError(d, why)) from e
                except ray.exceptions.RayActorError:
                    self._mark_prefill_dead(p)
                    raise
            stream = self.decode[d].stream.remote(tid)
            if p is not None:
                item = PrefillItem(tid, request_id, tuple(prompt), sampling, d, tuple(blocks))
                phase = self._phases[request_id] = "prefill"
                try:
                    result = await self._prefill(p, item)
                except Exception as e:
                    # the prefill side failed (its batch raised, or its actor died): it sends
                    # nothing more, and a batch that died half-sent dropped its links
                    phase = "prefill-failed"
                    if isinstance(e, ray.exceptions.RayActorError):
                        self._mark_prefill_dead(p)
                        raise
                    await self._forget_link(p, d, links)
                    if isinstance(e, KVLinkError):  # Ray's wrapper: keep the cause's message
                        raise _LinkFailed(KVLinkError(e.decode_instance, e.message)) from e
                    raise
                phase = self._phases[request_id] = "decode"
                trace.prefill_queue_s, trace.prefill_s = result.queue_s, result.compute_s
                trace.kv_wait_s = result.kv_wait_s
                yield StepDelta([result.first_token], [result.logprobs])
            async for ref in stream:
                delta: StepDelta = await ref
                if delta.load is not None:
                    self._loads[d] = delta.load
                trace.kv_bytes += delta.kv_bytes
                trace.transfer_s += delta.transfer_s
                if delta.finish_reason or delta.error:
                    phase = "done"
                yield delta
                if phase == "done":
                    return
        finally:
            self._phases.pop(request_id, None)
            if phase != "done":
                await asyncio.shield(self._abort(tid, p, d, phase))
            async with self._capacity:
                self._capacity.notify_all()

    async def _prefill(self, p: PrefillInstance, item: PrefillItem) -> PrefillResult:
        n = len(item.prompt_token_ids)
        p.queued_tokens += n
        p.queued_requests += 1
        try:
            result: PrefillResult = await p.leader.prefill.remote(item)
            return result
        finally:
            p.queued_tokens -= n
            p.queued_requests -= 1

    async def _abort(self, tid: int, p: PrefillInstance | None, d: int, phase: str) -> None:
        """Free the request on both sides; decode keeps blocks whose KV may still arrive."""
        pending = False
        if phase == "prefill" and p is not None:
            try:
                pending = not await p.leader.abort.remote(tid)
            except ray.exceptions.RayActorError:
                pending = False  # a dead prefill sends nothing more
        try:
            await self.decode[d].abort.remote(tid, pending)
        except ray.exceptions.RayActorError:
            logger.warning("decode replica %d died holding transfer %d", d, tid)

    # -- placement --------------------------------------------------------------------------

    def _pick_prefill(self) -> PrefillInstance:
        alive = [p for p in self.prefill if p.index not in self._dead_prefill]
        if not alive:
            raise NoCapacityError("no prefill instance is alive: redeploy (pdserve down/up)")
        loads = [PrefillLoad(i, p.queued_tokens, p.queued_requests) for i, p in enumerate(alive)]
        return alive[pick_prefill(self.config.prefill_policy, loads, next(self._prefill_turn))]

    def _mark_prefill_dead(self, p: PrefillInstance) -> None:
        """A dead rank takes its instance out of rotation (its TP group cannot run a batch);
        its links go with it, the rest of the pool serves on."""
        if p.index not in self._dead_prefill:
            logger.error("prefill instance %d has a dead rank; routing around it", p.index)
            self._dead_prefill.add(p.index)
            for key in [k for k in self._links if k[0] == p.index]:
                del self._links[key]

    def _mark_decode_dead(self, d: int) -> None:
        """A dead replica takes its links with it; the rest of the pool serves on."""
        if d not in self._dead:
            logger.error("decode replica %d is dead; routing around it", d)
            self._dead.add(d)
            for key in [k for k in self._links if k[1] == d]:
                del self._links[key]

    @property
    def dead_instances(self) -> dict[str, list[int]]:
        """Instances taken out of rotation after their actors died (for status)."""
        return {"prefill": sorted(self._dead_prefill), "decode": sorted(self._dead)}

    async def _reserve(self, req: DecodeRequest) -> tuple[int, list[int]]:
        """Blocks on some decode replica; waits while all are full (never when impossible)."""
        needed = -(-len(req.prompt_token_ids) // self.config.block_size)
        if all(needed > load.total_blocks for load in self._loads):
            raise NoCapacityError(
                f"a prompt of {len(req.prompt_token_ids)} tokens needs {needed} KV blocks; the "
                f"largest decode replica has {max(x.total_blocks for x in self._loads)}: "
                "give decode a larger KV cache or send a shorter prompt"
            )
        while True:
            tried: set[int] = set(self._dead)
            while len(tried) < len(self.decode):
                loads = [x for x in self._loads if x.instance not in tried]
                d = pick_decode(self.config.decode_policy, loads, needed, next(self._decode_turn))
                if d is None:
                    break
                try:
                    blocks, load = await self._reserve_on(d, req)
                except ray.exceptions.RayActorError:
                    self._mark_decode_dead(d)
                    tried.add(d)
                    continue
                self._loads[d] = load
                if blocks is not None:
                    return d, blocks
                tried.add(d)
            if len(self._dead) == len(self.decode):
                raise NoCapacityError("no decode replica is alive: redeploy (pdserve down/up)")
            async with self._capacity:  # a finishing request frees blocks and wakes us
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._capacity.wait(), timeout=1.0)
            alive = [i for i in range(len(self.decode)) if i not in self._dead]
            fresh = await asyncio.gather(*(self.decode[i].get_load.remote() for i in alive))
            for i, load in zip(alive, fresh):
                self._loads[i] = load

    async def _reserve_on(self, d: int, req: DecodeRequest) -> tuple[list[int] | None, DecodeLoad]:
        """One reserve call that cannot leak: if the caller goes away while it is in flight,
        whatever it reserved is released as soon as it answers."""
        call = asyncio.ensure_future(self.decode[d].reserve.remote(req))
        try:
            result: tuple[list[int] | None, DecodeLoad] = await asyncio.shield(call)
            return result
        except asyncio.CancelledError:
            task = asyncio.get_running_loop().create_task(
                self._release_late(call, d, req.transfer_id)
            )
            self._background.add(task)  # keep a reference until it is done
            task.add_done_callback(self._background.discard)
            raise

    async def _release_late(self, call: asyncio.Future[Any], d: int, tid: int) -> None:
        blocks, _ = await call
        if blocks is not None:
            await self.decode[d].abort.remote(tid, False)

    async def _ensure_links(self, p: PrefillInstance, d: int) -> asyncio.Task[None]:
        """Create the links from each KV-sending rank of ``p`` to replica ``d`` once; returns the
        task that made them (``_forget_link`` compares it)."""
        key = (p.index, d)
        task = self._links.get(key)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.get_running_loop().create_task(self._connect(p, d))
            self._links[key] = task
        await asyncio.shield(task)
        return task

    async def _forget_link(self, p: PrefillInstance, d: int, task: asyncio.Task[None]) -> None:
        """After a failed prefill: the prefill side dropped its link to ``d``, so the next request
        builds a new one (unless another failure already replaced ``task``); a replica that no
        longer answers is marked dead."""
        if self._links.get((p.index, d)) is task:
            del self._links[(p.index, d)]
        try:
            await self.decode[d].get_load.remote()
        except ray.exceptions.RayActorError:
            self._mark_decode_dead(d)

    async def _connect(self, p: PrefillInstance, d: int) -> None:
        generation = next(self._link_generation)  # a rebuilt link never reuses a name

        async def one(rank: int) -> None:
            name = f"{self.config.link_prefix}/p{p.index}r{rank}-d{d}.{generation}"
            try:
                host, port = await self.decode[d].listen.remote(name)
            except ray.exceptions.RayActorError as e:  # the decode side's death, not prefill's
                raise _DecodeDied(d) from e
            await p.ranks[rank].connect_link.remote(d, name, host, port)

        await asyncio.gather(*(one(r) for r in p.senders))
        logger.info("kv links prefill %d -> decode %d up", p.index, d)
