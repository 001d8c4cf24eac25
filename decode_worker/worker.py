"""The decode actor: one data-parallel replica with a paged KV cache and continuous batching.

Life of a request here (keyed by the router's transfer id)::

    reserve ──▶ RESERVED ──KV + first token land──▶ scheduler (ready/running) ──stop──▶ freed
                   │ abort: freed now if no KV is coming, else when it has landed      │
                   └──────────────────────────────────── abort: freed after the step ◀─┘

Colocated mode: the KV comes from this replica's own steps instead (`LocalPrefillQueue`: whole
prompts with priority over decode, or chunk by chunk beside it); the first token is sampled when
a prompt's last chunk has run. Abort frees at once between steps, after the step mid-chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from pdserve.decode_worker.prefill_queue import LocalPrefillQueue, PrefillChunk
from pdserve.decode_worker.runner import ChunkInput, DecodeRunner
from pdserve.decode_worker.scheduler import DecodeScheduler, DecodeSeq, ScheduleOutput
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache, num_blocks_for_bytes
from pdserve.engine.load import DecodeLoad, DecodeStats
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup
from pdserve.engine.request import DecodeRequest, StepDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplerOutput, SamplingRow, TokenLogprobs
from pdserve.engine.spec import DecodeSpec, EngineSpec, resolve_host
from pdserve.engine.stop import check_token_stop
from pdserve.kv_transfer.descriptor import TransferItem
from pdserve.kv_transfer.layout import blocks_for
from pdserve.kv_transfer.link import RECEIVER, KVLink, resolve_backend
from pdserve.kv_transfer.receiver import KVReceiver, ReceivedBatch

logger = logging.getLogger(__name__)

MAX_UNCLAIMED = 10_000


@dataclass
class _Request:
    req: DecodeRequest
    queue: asyncio.Queue[StepDelta] = field(default_factory=asyncio.Queue)
    heads: int = 0  # KV heads landed so far (summed over the prefill ranks' slices)
    first_token: int | None = None
    kv_bytes: int = 0
    transfer_s: float = 0.0
    aborted: bool = False  # abort asked while KV is in flight: free once it has landed
    running: bool = False
    attached: bool = False  # a stream() call is reading the queue
    first_logprobs: TokenLogprobs | None = None  # colocated: from the local prefill


@dataclass
class _Step:
    """One engine step: the decode scheduler's batch and the local prefill chunks."""

    out: ScheduleOutput
    chunks: list[PrefillChunk]


class DecodeWorker:
    """Ray actor (async). Construct through ``cluster``; methods are called by the router."""

    def __init__(self, engine: EngineSpec, spec: DecodeSpec) -> None:
        torch.set_num_threads(engine.num_threads)
        self.engine = engine
        self.spec = spec
        self.device = torch.device(engine.device)
        self.host = resolve_host(engine.host)
        cfg = ModelConfig.from_pretrained(
            engine.model,
            dtype=engine.dtype,
            device=engine.device,
            max_model_len=engine.max_model_len,
        )
        self.config = cfg
        model = load_model(cfg, TPGroup.single(), self.device)  # first: the cache gets the rest
        num_blocks = spec.num_blocks or num_blocks_for_bytes(
            cfg, 1, engine.block_size, self._kv_budget(spec)
        )
        self.blocks = BlockManager(num_blocks, engine.block_size)
        self.scheduler = DecodeScheduler(self.blocks, spec.max_num_seqs, cfg.max_model_len)
        kv_cache = allocate_kv_cache(cfg, 1, num_blocks, engine.block_size, self.device)
        self.runner = DecodeRunner(model, kv_cache, engine.block_size, self.device)
        self._requests: dict[int, _Request] = {}
        self._inflight: dict[str, set[int]] = defaultdict(set)  # link -> transfers mid-receive
        self._receivers: dict[str, KVReceiver] = {}
        self._deferred_aborts: set[int] = set()
        # finished before their stream() call arrived; oldest dropped beyond MAX_UNCLAIMED
        self._unclaimed: dict[int, asyncio.Queue[StepDelta]] = {}
        # colocated: reserved prompts waiting for (the rest of) their local prefill
        self._prefills = LocalPrefillQueue(
            spec.max_num_batched_tokens, spec.max_num_seqs, spec.chunked_prefill
        )
        self._prefilling: set[int] = set()  # prompts with a chunk in the step running now
        self._stepping = False
        self.num_preemptions = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._step_task: asyncio.Task[None] | None = None

    def _kv_budget(self, spec: DecodeSpec) -> int:
        """Bytes for the KV cache: a fixed size, or (CUDA) a fraction of the GPU's memory less
        what the weights already use, keeping 10% of the remainder for activations."""
        if spec.kv_cache_memory_fraction is None or self.device.type != "cuda":
            return spec.kv_cache_bytes
        free, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * spec.kv_cache_memory_fraction) - (total - free)
        if budget <= 0:
            raise ValueError(
                f"decode.kv_cache.memory_fraction={spec.kv_cache_memory_fraction} leaves no room "
                f"for the KV cache after the weights ({(total - free) / 2**30:.1f} GiB used of "
                f"{total / 2**30:.1f} GiB): raise the fraction or use a smaller model"
            )
        return int(budget * 0.9)

    def _ensure_loop(self) -> None:
        if self._step_task is None:
            self._loop = asyncio.get_running_loop()
            self._step_task = self._loop.create_task(self._step_loop())

    # -- links ------------------------------------------------------------------------------

    async def listen(self, name: str) -> tuple[str, int]:
        """Host link ``name``; the prefill rank joins at the returned address."""
        self._ensure_loop()
        store = KVLink.host_store(self.host)
        backend = resolve_backend(self.engine.kv_backend, self.device)
        assert self._loop is not None
        loop = self._loop

        def join() -> None:
            link = KVLink.connect(
                name, backend, RECEIVER, self.device, self.host, store.port, store=store
            )
            receiver = KVReceiver(
                link,
                self.runner.kv_cache,
                self.engine.block_size,
                lambda item: self._accept(name, item),
                lambda b: loop.call_soon_threadsafe(self._on_batch, b),
                lambda n, e: loop.call_soon_threadsafe(self._on_link_error, n, e),
            )
            self._receivers[name] = receiver
            receiver.start()

        loop.run_in_executor(None, join)
        return self.host, store.port

    def _accept(self, link: str, item: TransferItem) -> bool:
        # runs on a receiver thread: only reads the dict and adds to a set
        r = self._requests.get(item.transfer_id)
        if r is None or r.running:
            return False
        if tuple(self.blocks.block_table(item.transfer_id)) != item.block_ids:
            logger.error("transfer %d names blocks it does not hold; dropped", item.transfer_id)
            return False
        self._inflight[link].add(item.transfer_id)
        return True

    def _on_batch(self, batch: ReceivedBatch) -> None:
        per_block = batch.nbytes // max(batch.header.num_blocks, 1)  # every layer's, exact
        for i, (item, ok) in enumerate(zip(batch.header.items, batch.accepted)):
            self._inflight[batch.link].discard(item.transfer_id)
            r = self._requests.get(item.transfer_id)
            if not ok or r is None:
                continue
            r.heads += batch.header.num_heads
            r.kv_bytes += per_block * blocks_for(item.num_tokens, batch.header.block_size)
            r.transfer_s = max(r.transfer_s, batch.seconds)
            if batch.first_tokens is not None:
                r.first_token = batch.first_tokens[i]
            if r.heads == self.config.num_kv_heads and r.first_token is not None:
                self._land(r)

    def _on_link_error(self, name: str, error: BaseException) -> None:
        self._receivers.pop(name, None)
        for tid in self._inflight.pop(name, set()):
            r = self._requests.get(tid)
            if r is not None and not r.running:
                self._drop(r, StepDelta(error=f"KV transfer failed on link {name}: {error}"))

    # -- requests ---------------------------------------------------------------------------

    async def reserve(self, req: DecodeRequest) -> tuple[list[int] | None, DecodeLoad]:
        """Reserve blocks for the prompt's KV before its prefill runs; None when full."""
        self._ensure_loop()
        blocks = self.scheduler.reserve(req.transfer_id, len(req.prompt_token_ids))
        if blocks is not None:
            self._requests[req.transfer_id] = _Request(req)
            if req.local_prefill:
                self._prefills.add(req.transfer_id, len(req.prompt_token_ids))
                self._wake.set()
        return blocks, self.load()

    async def abort(self, transfer_id: int, transfer_pending: bool) -> bool:
        """Forget a request and free its blocks; with KV still in flight, once it has landed."""
        r = self._requests.get(transfer_id)
        if r is None:
            return False
        if (r.running and self._stepping) or transfer_id in self._prefilling:
            self._deferred_aborts.add(transfer_id)
        elif not r.running and (transfer_pending or self._receiving(transfer_id)):
            r.aborted = True  # a receiver may be writing its blocks: free once it lands or fails
        else:
            self._drop(r, StepDelta(finish_reason="abort"))
        return True

    def _receiving(self, transfer_id: int) -> bool:
        # list(): receiver threads may add a link entry meanwhile
        return any(transfer_id in tids for tids in list(self._inflight.values()))

    async def stream(self, transfer_id: int) -> AsyncIterator[StepDelta]:
        """Deltas of one request until it finishes; batches whatever piled up between reads."""
        r = self._requests.get(transfer_id)
        if r is not None:
            r.attached = True
            queue = r.queue
        elif (done := self._unclaimed.pop(transfer_id, None)) is not None:
            queue = done  # it finished before this call arrived
        else:
            yield StepDelta(error=f"transfer {transfer_id} is unknown on this decode replica")
            return
        while True:
            delta = await queue.get()
            while not queue.empty():
                delta.merge(queue.get_nowait())
            delta.load = self.load()
            yield delta
            if delta.finish_reason or delta.error:
                return

    def load(self) -> DecodeLoad:
        s = self.scheduler
        return DecodeLoad(
            self.spec.instance,
            self.blocks.num_free_blocks,
            self.blocks.num_blocks,
            s.num_running + self._prefills.num_partial,
            s.num_waiting + self._prefills.num_waiting,  # colocated: prompts not yet prefilled
        )

    async def node_id(self) -> str:
        """The Ray node this worker runs on (placement checks, status)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    async def get_load(self) -> DecodeLoad:
        return self.load()

    async def stats(self) -> DecodeStats:
        return DecodeStats(
            self.load(),
            self.scheduler.num_reserved,
            self.num_preemptions,
            tuple(sorted(self._receivers)),
            self._prefills.num_partial,
        )

    async def check_integrity(self) -> int:
        """Raise if any block is lost or double-owned; returns the number of known requests."""
        self.scheduler.check_integrity()
        known = set(self.blocks.owners())
        assert known <= set(self._requests), (
            f"blocks held by forgotten requests: {known - set(self._requests)}"
        )
        return len(self._requests)

    # -- internals --------------------------------------------------------------------------

    def _land(self, r: _Request) -> None:
        """All KV slices and the first token are here: start decoding (or finish at once)."""
        tid, req = r.req.transfer_id, r.req
        if r.aborted:
            self._drop(r, StepDelta(finish_reason="abort"))
            return
        assert r.first_token is not None
        prompt = list(req.prompt_token_ids)
        seq = DecodeSeq(tid, len(prompt), req.sampling.max_tokens, [*prompt, r.first_token])
        stats = StepDelta(kv_bytes=r.kv_bytes, transfer_s=r.transfer_s)
        if req.local_prefill:  # nobody else has streamed the first token
            stats.token_ids, stats.logprobs = [r.first_token], [r.first_logprobs]
        reason = self._stop_reason(seq, r.first_token)
        if reason is not None:
            stats.finish_reason = reason
            self._drop(r, stats)
            return
        self.scheduler.activate(seq)
        r.running = True
        r.queue.put_nowait(stats)
        self._wake.set()

    def _stop_reason(self, seq: DecodeSeq, token: int) -> str | None:
        reason = check_token_stop(
            token,
            seq.num_output,
            len(seq.token_ids),
            self._requests[seq.seq_id].req.sampling,
            self.config.eos_token_ids,
            self.config.max_model_len,
        )
        if reason is None and self.scheduler.reached_length_limit(seq):
            reason = "length"
        return reason

    def _drop(self, r: _Request, last: StepDelta) -> None:
        tid = r.req.transfer_id
        self.scheduler.abort(tid)
        self._requests.pop(tid, None)
        self._prefills.remove(tid)
        r.queue.put_nowait(last)
        if not r.attached:  # the router's stream call may still be on its way: keep the deltas
            self._unclaimed[tid] = r.queue
            while len(self._unclaimed) > MAX_UNCLAIMED:
                self._unclaimed.pop(next(iter(self._unclaimed)))

    async def _step_loop(self) -> None:
        while True:
            try:
                await self._one_step()
            except Exception as e:  # a bug outside the forward: fail what is held, keep serving
                logger.exception("decode step loop error")
                held = [r for r in self._requests.values() if r.running or r.req.local_prefill]
                self._fail(held, f"decode step failed: {type(e).__name__}: {e}")
            await asyncio.sleep(0)  # let reserve/abort/stream calls in between steps

    async def _one_step(self) -> None:
        step = self._plan()
        if not (step.out.decode or step.out.recompute or step.chunks):
            self._wake.clear()
            await self._wake.wait()
            return
        await self._run(step)
        for tid in self._deferred_aborts:
            if tid in self._requests:
                self._drop(self._requests[tid], StepDelta(finish_reason="abort"))
        self._deferred_aborts.clear()

    def _plan(self) -> _Step:
        if self._prefills.prefill_only:  # colocated, prefill priority: no decode this step
            return _Step(ScheduleOutput(), self._prefills.schedule(0))
        out = self.scheduler.schedule()  # decode first; chunked prefill gets the budget left
        return _Step(out, self._prefills.schedule(out.num_tokens))

    async def _run(self, step: _Step) -> None:
        """Decode, recompute and local prefill chunks of one step, in one forward pass."""
        out = step.out
        self.num_preemptions += len(out.preempted)
        tables = [self.blocks.block_table(s.seq_id) for s in out.decode]
        chunks, rows = self._inputs(step)
        self._stepping, self._prefilling = True, {c.seq_id for c in step.chunks}
        try:
            result = await asyncio.to_thread(self.runner.run, out.decode, tables, chunks, rows)
        except Exception as e:  # a failed step fails its requests, never the replica
            logger.exception("step failed")
            prefills = [self._requests[c.seq_id] for c in step.chunks]
            self._fail([*out.decode, *out.recompute, *prefills], f"step failed: {e}")
            return
        finally:
            self._stepping, self._prefilling = False, set()
        self._apply(step, result)

    def _inputs(self, step: _Step) -> tuple[list[ChunkInput], list[SamplingRow]]:
        """The step's chunks (recomputes, then prompt chunks) and sampling rows (decode seqs,
        then the prompts whose last chunk runs), in the order the runner takes them."""
        table = self.blocks.block_table
        # recompute: rebuild the cache of all but the last token, which the next step decodes
        chunks = [
            ChunkInput(s.token_ids[:-1], 0, table(s.seq_id), False) for s in step.out.recompute
        ]
        rows = [
            SamplingRow(
                self._sampling(s.seq_id), s.token_ids[: s.prompt_len], s.token_ids[s.prompt_len :]
            )
            for s in step.out.decode
        ]
        for c in step.chunks:
            prompt = self._requests[c.seq_id].req.prompt_token_ids
            chunks.append(ChunkInput(prompt[c.start : c.end], c.start, table(c.seq_id), c.last))
            if c.last:
                rows.append(SamplingRow(self._sampling(c.seq_id), prompt, ()))
        return chunks, rows

    def _sampling(self, tid: int) -> SamplingParams:
        return self._requests[tid].req.sampling

    def _fail(self, items: Sequence[DecodeSeq | _Request], message: str) -> None:
        for item in items:
            tid = item.seq_id if isinstance(item, DecodeSeq) else item.req.transfer_id
            if tid in self._requests:
                self._drop(self._requests[tid], StepDelta(error=message))

    def _apply(self, step: _Step, result: SamplerOutput | None) -> None:
        decode, n = step.out.decode, len(step.out.decode)
        self.scheduler.on_step_done(decode)
        sampled = result or SamplerOutput([], [])
        for seq, token, logprobs in zip(decode, sampled.token_ids, sampled.logprobs):
            seq.token_ids.append(token)
            r = self._requests[seq.seq_id]
            reason = self._stop_reason(seq, token)
            delta = StepDelta([token], [logprobs], finish_reason=reason)
            if reason is None:
                r.queue.put_nowait(delta)
            else:
                self._drop(r, delta)
        self._prefills.on_done(step.chunks)
        finished = [c for c in step.chunks if c.last]  # their first tokens follow the decode ones
        for c, token, logprobs in zip(finished, sampled.token_ids[n:], sampled.logprobs[n:]):
            r = self._requests[c.seq_id]
            r.first_token, r.first_logprobs = token, logprobs
            r.heads = self.config.num_kv_heads
            self._land(r)
