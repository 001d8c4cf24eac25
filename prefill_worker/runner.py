"""One prefill step on one TP rank: forward pass, KV sent layer by layer, first tokens sampled.

``run_step`` is what a prefill worker runs: prompts (or chunks of them) computed into the rank's
paged KV cache past what it holds already (its prefix cache, earlier chunks), attending over
it, and the blocks decode lacks sent from that cache. ``run`` computes whole prompts with no
cache and sends their K/V as the forward makes them (the benchmarks' cache-free path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pdserve.engine.attention import MixedMetadata, PrefillMetadata
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.kv_quant import kv_dtype_name, storage_dtype
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup, is_kv_sender, kv_head_range
from pdserve.engine.request import PrefillItem, replay_row
from pdserve.engine.sampling import Sampler
from pdserve.engine.sampling_types import SamplerOutput, SamplingRow
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.layout import token_ranges
from pdserve.kv_transfer.link import KVLink
from pdserve.prefill_worker.scheduler import PrefillWork
from pdserve.prefill_worker.sends import CacheSends, ForwardSends


class PrefillRunner:
    """Holds one rank's model shard; runs batches the leader hands to every rank alike."""

    def __init__(
        self,
        model: CausalLM,
        tp: TPGroup,
        device: torch.device,
        block_size: int,
        kv_dtype: str = "auto",
        num_blocks: int = 0,
    ) -> None:
        """``num_blocks``: this rank's paged KV cache (its head slice, in the decode cache's
        format ``kv_dtype``), which ``run_step`` needs; 0: none (``run`` only)."""
        self.model = model
        self.tp = tp
        self.device = device
        cfg = model.config
        # the decode replicas' block size and KV format: the KV travels as their cache holds it
        self.block_size = block_size
        self.kv_dtype = storage_dtype(kv_dtype, cfg.dtype)
        self.head_start, self.head_end = kv_head_range(cfg.num_kv_heads, tp.rank, tp.size)
        self.sends_kv = is_kv_sender(cfg.num_kv_heads, tp.rank, tp.size)
        self.sampler = Sampler()
        self.kv_cache = (
            allocate_kv_cache(cfg, tp.size, num_blocks, block_size, device, kv_dtype)
            if num_blocks
            else None
        )

    @torch.inference_mode()
    def run_step(
        self, works: Sequence[PrefillWork], links: Mapping[int, KVLink]
    ) -> tuple[dict[int, tuple[int, Any]], dict[int, str]]:
        """Compute ``works`` (each prompt's positions [start, end), written into its cache
        blocks, attending over the ones before) and send each its blocks [send_start,
        send_end) from the cache, layer by layer as each layer's K/V are written. Returns, on
        rank 0, the first token (and its logprobs) of each prompt completed, by transfer id
        ({} elsewhere), and the destinations whose link failed, with the reason."""
        assert self.kv_cache is not None, "run_step needs a PrefillRunner with num_blocks"
        bs, dev = self.block_size, self.device
        sends = CacheSends(works, links, self.kv_cache, bs)
        if self.sends_kv:
            sends.headers(self._header_of)
        spans = [range(w.start, w.end) for w in works]
        ids = [w.item.prompt_token_ids[i] for w, span in zip(works, spans) for i in span]
        slots = [w.table[p // bs] * bs + p % bs for w, span in zip(works, spans) for p in span]
        meta = MixedMetadata(
            decode=None,
            chunk_starts=[w.start for w in works],
            chunk_lens=[w.num_tokens for w in works],
            chunk_tables=[list(w.table) for w in works],
            chunk_slots=torch.tensor(slots, dtype=torch.int64, device=dev),
        )
        positions = torch.tensor([p for span in spans for p in span], device=dev)
        hidden = self.model(
            torch.tensor(ids, device=dev),
            positions,
            meta,
            self.kv_cache,
            sends.layer if self.sends_kv else None,
        )
        firsts: dict[int, tuple[int, Any]] = {}
        if self.tp.rank == 0:
            firsts = self._sample_last(works, hidden)
            sends.trailers({tid: token for tid, (token, _) in firsts.items()})
        if self.sends_kv:
            sends.flush()
        return firsts, sends.broken

    def _sample_last(
        self, works: Sequence[PrefillWork], hidden: torch.Tensor
    ) -> dict[int, tuple[int, Any]]:
        """The first token of each prompt whose last position ran, from its logits."""
        ends = torch.tensor([w.num_tokens for w in works], dtype=torch.int64).cumsum(0) - 1
        done = [(w, int(e)) for w, e in zip(works, ends) if w.last]
        if not done:
            return {}
        index = torch.tensor([e for _, e in done], dtype=torch.int64, device=self.device)
        rows = [_row(w.item) for w, _ in done]
        out = self.sampler(self.model.compute_logits(hidden.index_select(0, index)), rows)
        return {
            w.item.transfer_id: (token, logprobs)
            for (w, _), token, logprobs in zip(done, out.token_ids, out.logprobs)
        }

    def _header_of(self, items: tuple[TransferItem, ...], has_trailer: bool) -> TransferHeader:
        cfg = self.model.config
        return TransferHeader(
            items=items,
            num_layers=cfg.num_layers,
            dtype=kv_dtype_name(self.kv_dtype),
            head_start=self.head_start,
            head_end=self.head_end,
            head_dim=cfg.head_dim,
            block_size=self.block_size,
            has_trailer=has_trailer and self.tp.rank == 0,
        )

    @torch.inference_mode()
    def run(
        self, items: Sequence[PrefillItem], links: Mapping[int, KVLink]
    ) -> tuple[SamplerOutput | None, dict[int, str]]:
        """Prefill ``items``; returns the sampled first tokens on rank 0 (None elsewhere) and the
        destinations whose link failed, each with the reason.

        Every KV-sending rank sends each destination one header, then one tensor per layer (K and
        V in the decode cache's block layout) as soon as the layer's K/V exist (overlapping the
        rest of the forward pass), and rank 0 finally sends the first tokens. All sends have
        left when this returns. A link that fails (its decode replica died, or it was never
        made) stops only the sends to that destination: the batch's other items still reach
        theirs.
        """
        seq_lens = [len(item.prompt_token_ids) for item in items]
        ranges = token_ranges(seq_lens)
        # each item's KV from its first block the decode replica does not hold
        bs = self.block_size
        sent = [(s + it.decode_cached_blocks * bs, e) for it, (s, e) in zip(items, ranges)]
        sends = ForwardSends(items, links, sent, bs, self.kv_dtype)
        if self.sends_kv:
            sends.headers(self._header)
        input_ids = torch.tensor(
            [t for it in items for t in it.prompt_token_ids], device=self.device
        )
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(self.device)
        meta = PrefillMetadata(seq_lens)
        hidden = self.model(
            input_ids, positions, meta, None, sends.layer if self.sends_kv else None
        )
        out = None
        if self.tp.rank == 0:
            last = torch.tensor([end - 1 for _, end in ranges], device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, last))
            out = self.sampler(logits, [_row(it) for it in items])
            sends.trailers(out.token_ids)
        if self.sends_kv:
            sends.flush()
        return out, sends.broken

    def _header(self, items: Sequence[PrefillItem]) -> TransferHeader:
        return self._header_of(tuple(_transfer_item(it, self.block_size) for it in items), True)


def _transfer_item(item: PrefillItem, block_size: int) -> TransferItem:
    """The part of ``item``'s KV that travels: its blocks past the decode replica's cache."""
    cached = item.decode_cached_blocks
    n = len(item.prompt_token_ids) - cached * block_size
    return TransferItem(item.transfer_id, item.request_id, n, item.block_ids[cached:], cached)


def _row(item: PrefillItem) -> SamplingRow:
    """The first token's sampling row (a migrated request's replayed tokens are outputs)."""
    return replay_row(item.sampling, item.prompt_token_ids, item.num_replayed)
