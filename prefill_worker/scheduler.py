"""The prefill leader's queue and its paged KV cache's blocks: which prompts (or chunks of them)
each step computes, and which of their blocks go to decode with it. Pure Python (no torch, no
Ray): the leader decides, every TP rank runs the `PrefillWork` it broadcasts.

A prompt's life here (keyed by the router's transfer id)::

    add ──▶ waiting ──start: blocks allocated, the cached prefix shared──▶ started
                                        ──each step: a chunk computed, its blocks sent──▶ done
    remove (abort, failure) at any point between steps: its references released once

Prefix caching (``caching``): a started prompt takes a reference on the leading blocks of its
prompt found in the cache (never its last position: its logits give the first token) and
computes from there; its full blocks are registered as their KV is computed, and once the
prompt is done its blocks stay cached until their memory is needed (LRU, `BlockManager`).

Batching: without chunking a step takes whole prompts FCFS within ``max_batch_tokens`` (a
longer one alone), as before. With ``chunked``, a step first takes waiting prompts that fit
the budget whole, in arrival order (a prompt longer than the budget is passed over, not waited
behind), then spends what is left on the next chunk of each started prompt and then of the
long waiting ones; a chunk that is not a prompt's last covers whole blocks. While a chunked
prompt is under way the short ones leave it at least ``chunk_floor`` tokens a step, so a
stream of short prompts slows a long one but never stops it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.engine.batching import take_batch
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.prefix_hash import block_hashes
from pdserve.engine.request import PrefillItem


@dataclass(frozen=True)
class PrefillWork:
    """One prompt's share of one step, as every TP rank runs it: prompt positions
    [start, end) are computed into the cache blocks ``table``, then the prompt's blocks
    [send_start, send_end) (computed now or before, or found cached) go to decode."""

    item: PrefillItem
    start: int
    end: int
    table: tuple[int, ...]
    send_start: int
    send_end: int

    @property
    def prompt_len(self) -> int:
        return len(self.item.prompt_token_ids)

    @property
    def last(self) -> bool:
        """The prompt is complete after this step: its first token is sampled from it."""
        return self.end == self.prompt_len

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def sends(self) -> bool:
        """Whether its decode replica hears from this step (blocks, or the first token)."""
        return self.last or self.send_end > self.send_start


@dataclass
class _Prompt:
    item: PrefillItem
    hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks
    started: bool = False
    computed: int = 0  # positions whose KV is in the cache (cached or computed)
    cached: int = 0  # of those, found in the prefix cache
    sent: int = 0  # blocks decode has or was sent: it needs [sent, prompt blocks)

    @property
    def length(self) -> int:
        return len(self.item.prompt_token_ids)


class PrefillScheduler:
    """The leader's FCFS queue over one TP group's paged KV cache of ``num_blocks`` blocks."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_batch_tokens: int,
        max_batch_size: int,
        chunked: bool = False,
        caching: bool = False,
        salt: int = 0,
    ) -> None:
        if chunked and max_batch_tokens < block_size:
            raise ValueError(
                f"max_batch_tokens={max_batch_tokens} must be at least the block size "
                f"({block_size}) with chunked prefill: chunks are whole blocks"
            )
        self.blocks = BlockManager(num_blocks, block_size, caching)
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.chunked = chunked
        self.salt = salt
        bs = block_size
        self.chunk_floor = min(max_batch_tokens, max(bs, max_batch_tokens // 4 // bs * bs))
        self.queries = 0  # prompt tokens looked up in the prefix cache (vLLM's counters)
        self.hits = 0  # of those, found cached: not computed
        self._prompts: dict[int, _Prompt] = {}  # insertion order = arrival order

    # -- the queue --------------------------------------------------------------------------

    def add(self, item: PrefillItem) -> None:
        """Queue a prompt; ValueError when it could never fit the cache."""
        tid, n = item.transfer_id, len(item.prompt_token_ids)
        if tid in self._prompts:
            raise ValueError(f"transfer {tid} is already queued for prefill")
        if n < 1:
            raise ValueError(f"transfer {tid}: an empty prompt has nothing to prefill")
        if self.blocks.blocks_for(n) > self.blocks.num_blocks:
            raise ValueError(
                f"a prompt of {n} tokens needs {self.blocks.blocks_for(n)} KV blocks but the "
                f"prefill cache holds {self.blocks.num_blocks}: raise prefill.kv_cache"
            )
        hashes = block_hashes(item.prompt_token_ids, self.block_size, self.salt)
        bs = self.block_size
        start = min(item.decode_cached_blocks, -(-n // bs))
        self._prompts[tid] = _Prompt(item, hashes if self.blocks.caching else [], sent=start)

    def remove(self, tid: int) -> bool:
        """Forget a prompt, releasing its blocks once; False when unknown."""
        p = self._prompts.pop(tid, None)
        if p is None:
            return False
        if p.started:
            self.blocks.free(tid)
        return True

    def started(self, tid: int) -> bool:
        p = self._prompts.get(tid)
        return p is not None and p.started

    def __contains__(self, tid: object) -> bool:
        return tid in self._prompts

    def __len__(self) -> int:
        return len(self._prompts)

    def tids(self, decode_instances: Iterable[int] | None = None) -> list[int]:
        """Every prompt's transfer id (only those bound to ``decode_instances`` if given)."""
        if decode_instances is None:
            return list(self._prompts)
        dests = set(decode_instances)
        return [t for t, p in self._prompts.items() if p.item.decode_instance in dests]

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens not computed yet."""
        return sum(p.length - p.computed for p in self._prompts.values())

    @property
    def num_partial(self) -> int:
        """Prompts some of whose chunks ran, more to come."""
        return sum(1 for p in self._prompts.values() if p.started)

    # -- the step ---------------------------------------------------------------------------

    def schedule(self) -> list[PrefillWork]:
        """This step's work: started prompts' blocks are held until they are done."""
        if not self.chunked:
            return self._whole_prompts()
        budget, works = self.max_batch_tokens, list[PrefillWork]()
        running = [p for p in self._prompts.values() if p.started]
        floor = self.chunk_floor if running else 0
        for p in [p for p in self._prompts.values() if not p.started]:
            if len(works) == self.max_batch_size:
                break
            rest = p.length - self._expected_hits(p)
            if rest > self.max_batch_tokens:
                continue  # long: its chunks come below
            if rest > budget - floor or not self._start(p):
                break
            works.append(self._work(p, p.length))
            budget -= p.length - p.computed
        longs = [p for p in self._prompts.values() if not p.started]
        for p in running + longs:
            if len(works) == self.max_batch_size or budget <= 0:
                break
            if not p.started and not self._start(p):
                break
            n = p.length - p.computed
            if n > budget:
                n = budget // self.block_size * self.block_size
                if n == 0:
                    break
            works.append(self._work(p, p.computed + n))
            budget -= n
        return works

    def on_step_done(self, works: Sequence[PrefillWork]) -> dict[int, int]:
        """Every rank ran ``works``: advance each prompt, register its computed full blocks,
        release the finished ones (their blocks stay cached). Returns the finished prompts'
        ids, each with its tokens found cached (not computed); a prompt removed meanwhile is
        skipped."""
        done: dict[int, int] = {}
        for w in works:
            tid = w.item.transfer_id
            p = self._prompts.get(tid)
            if p is None:
                continue
            p.computed, p.sent = w.end, max(p.sent, w.send_end)
            self.blocks.register(tid, p.hashes[: w.end // self.block_size])
            if w.last:
                done[tid] = p.cached
                del self._prompts[tid]
                self.blocks.free(tid)
                self.queries += p.length
                self.hits += p.cached
        return done

    def check_integrity(self) -> int:
        """Raise if a block is lost or held by a prompt that is not started; returns the number
        of prompts known."""
        self.blocks.check_integrity()
        started = {t for t, p in self._prompts.items() if p.started}
        owners = set(self.blocks.owners())
        if owners != started:
            raise AssertionError(f"blocks held by {owners}, prompts started {started}")
        return len(self._prompts)

    # -- internals --------------------------------------------------------------------------

    def _lookup(self, p: _Prompt) -> list[int]:
        # the last position is always computed: its logits give the first token
        return p.hashes[: (p.length - 1) // self.block_size]

    def _expected_hits(self, p: _Prompt) -> int:
        return self.blocks.cached_prefix(self._lookup(p)) * self.block_size

    def _start(self, p: _Prompt) -> bool:
        """Allocate the prompt's blocks, sharing its cached prefix; False when they do not fit."""
        lookup = self._lookup(p)
        if not self.blocks.can_allocate(p.length, lookup):
            return False
        tid = p.item.transfer_id
        hits = self.blocks.cached_prefix(lookup)
        self.blocks.allocate(tid, p.length, lookup)
        p.started, p.computed = True, hits * self.block_size
        p.cached = p.computed
        return True

    def _work(self, p: _Prompt, end: int) -> PrefillWork:
        bs = self.block_size
        complete = -(-end // bs) if end == p.length else end // bs
        tid = p.item.transfer_id
        table = tuple(self.blocks.block_table(tid))
        return PrefillWork(p.item, p.computed, end, table, p.sent, max(p.sent, complete))

    def _whole_prompts(self) -> list[PrefillWork]:
        """Whole prompts (less their cached prefix) FCFS within the budget, a longer one alone."""
        waiting = [p for p in self._prompts.values() if not p.started]
        lens = [p.length - self._expected_hits(p) for p in waiting]
        works: list[PrefillWork] = []
        for p in waiting[: take_batch(lens, self.max_batch_tokens, self.max_batch_size)]:
            if not self._start(p):
                break
            works.append(self._work(p, p.length))
        return works
