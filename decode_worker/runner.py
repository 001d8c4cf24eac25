"""One decode replica's data plane: the model, its paged KV cache, and the step function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pdserve.decode_worker.cuda_graphs import StaticDecode, capture_sizes, start_static
from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.seq import DecodeSeq
from pdserve.decode_worker.step import EngineLimits, StepBatch
from pdserve.engine.attention import DecodeMetadata, MixedMetadata
from pdserve.engine.decode_attention import FLEX
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.kv_quant import storage_dtype
from pdserve.engine.model import CausalLM
from pdserve.engine.paged_flex_attention import resolve_attention_backend
from pdserve.engine.sampling import Sampler
from pdserve.engine.sampling_types import SamplerOutput
from pdserve.engine.speculative import Proposer


class DecodeRunner:
    """Runs `DecodeEngine` steps against the paged cache: decode tokens, recomputes and prompt
    chunks in one forward (the engine's `StepRunner`). With ``static``, a pure decode step that
    fits its padded sizes runs from its static buffers (a CUDA graph once captured, the flex
    attention path); every other step runs the plain path (SDPA attention)."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        device: torch.device,
        static: StaticDecode | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache  # [layers, num_blocks, 2, block_size, kv_heads, row]: its format
        self.block_size = block_size
        self.device = device
        self.static = static
        self.sampler = Sampler()

    def _slots(self, table: Sequence[int], positions: range) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> SamplerOutput | None:
        """One engine step in one forward: a decode token for each of ``batch.seqs`` and the
        ``batch.chunks``; samples ``batch.rows`` (None when there are none)."""
        if self.static is not None and self.static.takes(batch):
            hidden = self.static.forward(batch)
        else:
            hidden = self._forward(batch)
        if not batch.rows:
            return None
        return self.sampler(self.model.compute_logits(hidden), batch.rows)

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        """The plain path: hidden states of the rows to sample, [len(batch.rows), hidden]."""
        seqs, tables, chunks = batch.seqs, batch.tables, batch.chunks
        drafts = batch.drafts or [()] * len(seqs)
        dev = self.device
        ids = [t for s, d in zip(seqs, drafts) for t in (s.token_ids[-1], *d)]
        positions = [p for s, d in zip(seqs, drafts) for p in self._span(s, d)]
        num_decode = len(ids)
        ids += [t for c in chunks for t in c.token_ids]
        positions += [p for c in chunks for p in range(c.start, c.start + len(c.token_ids))]
        spans = [range(c.start, c.start + len(c.token_ids)) for c in chunks]
        meta = MixedMetadata(
            decode=self._decode_metadata(seqs, tables, drafts) if seqs else None,
            chunk_starts=[c.start for c in chunks],
            chunk_lens=[len(c.token_ids) for c in chunks],
            chunk_tables=[list(c.table) for c in chunks],
            chunk_slots=torch.tensor(
                [x for c, span in zip(chunks, spans) for x in self._slots(c.table, span)],
                dtype=torch.int64,
                device=dev,
            ),
        )
        hidden = self.model(
            torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta, self.kv_cache
        )
        # logits rows: every decode token and draft, then the last token of each sampled chunk
        ends = torch.tensor([len(c.token_ids) for c in chunks], dtype=torch.int64).cumsum(0)
        picked = [num_decode + int(e) - 1 for c, e in zip(chunks, ends) if c.sample]
        index = torch.tensor([*range(num_decode), *picked], dtype=torch.int64, device=dev)
        return hidden.index_select(0, index)

    @staticmethod
    def _span(seq: DecodeSeq, drafts: Sequence[int]) -> range:
        """Positions of a seq's decode token and its drafts."""
        last = len(seq.token_ids) - 1
        return range(last, last + 1 + len(drafts))

    def _decode_metadata(
        self,
        seqs: Sequence[DecodeSeq],
        tables: Sequence[Sequence[int]],
        drafts: Sequence[Sequence[int]],
    ) -> DecodeMetadata:
        spans = [self._span(s, d) for s, d in zip(seqs, drafts)]
        width = max(len(t) for t in tables)
        padded = [list(t) + [0] * (width - len(t)) for t in tables]
        dev = self.device
        lens = [len(r) for r in spans]
        return DecodeMetadata(
            block_tables=torch.tensor(padded, dtype=torch.int64, device=dev),
            context_lens=torch.tensor([r.stop for r in spans], dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(
                [x for t, r in zip(tables, spans) for x in self._slots(t, r)],
                dtype=torch.int64,
                device=dev,
            ),
            query_lens=lens if max(lens) > 1 else None,
        )


def build_engine(
    model: CausalLM,
    limits: EngineLimits,
    device: torch.device,
    instance: int = 0,
    kv_dtype: str = "auto",
    proposer: Proposer | None = None,
    *,
    attention_backend: str = "auto",
    enforce_eager: bool = False,
    cudagraph_capture_sizes: Sequence[int] | None = None,
) -> DecodeEngine:
    """A `DecodeEngine` over ``model`` with a fresh paged KV cache of ``limits.num_blocks``
    blocks in format ``kv_dtype`` (``decode.kv_cache.dtype``): what a decode replica, the
    engine benchmark and the profiler all run. ``proposer``: where speculative drafts come
    from when ``limits.speculative`` is set (default: n-gram lookup).

    ``attention_backend`` (``decode.attention_backend``): with flex (auto's choice on CUDA),
    pure decode steps run padded from static buffers, with one more cache block as their
    scratch block, captured as CUDA graphs on CUDA unless ``enforce_eager``.
    """
    c = model.config
    cache_dtype = storage_dtype(kv_dtype, c.dtype)
    backend = resolve_attention_backend(
        attention_backend, device, cache_dtype, c.dtype, limits.block_size
    )
    padded = backend == FLEX
    blocks = limits.num_blocks + 1 if padded else limits.num_blocks  # + the scratch block
    cache = allocate_kv_cache(c, 1, blocks, limits.block_size, device, kv_dtype)
    static = None
    if padded:
        sizes = capture_sizes(limits.max_num_seqs, cudagraph_capture_sizes)
        max_blocks = -(-limits.max_model_len // limits.block_size)
        static = StaticDecode(
            model, cache, limits.block_size, sizes, max_blocks, limits.num_blocks, backend
        )
        if device.type == "cuda":  # graphs, or with enforce_eager one compile, now
            static = start_static(static, not enforce_eager, required=attention_backend == FLEX)
    runner = DecodeRunner(model, cache, limits.block_size, device, static)
    return DecodeEngine(runner, limits, instance, proposer)


def model_limits(
    model: CausalLM,
    num_blocks: int,
    block_size: int,
    max_model_len: int | None = None,
    **knobs: Any,
) -> EngineLimits:
    """`EngineLimits` for ``model`` (its KV heads, EOS ids and, unless given, its context) and
    the given knobs (max_num_seqs, max_num_batched_tokens, chunked_prefill, prefix_caching,
    prefix_salt, block_bytes)."""
    c = model.config
    return EngineLimits(
        num_blocks=num_blocks,
        block_size=block_size,
        max_model_len=max_model_len or c.max_model_len,
        num_kv_heads=c.num_kv_heads,
        eos_token_ids=tuple(c.eos_token_ids),
        **knobs,
    )
