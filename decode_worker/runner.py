"""One decode replica's data plane: the model, its paged KV cache, and the step function."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.decode_worker.scheduler import DecodeSeq
from pdserve.engine.attention import DecodeMetadata, MixedMetadata, PrefillMetadata
from pdserve.engine.model import CausalLM
from pdserve.engine.sampling import Sampler
from pdserve.engine.sampling_types import SamplerOutput, SamplingRow


@dataclass(frozen=True)
class ChunkInput:
    """Positions [start, start + len(token_ids)) of one sequence to run through the model."""

    token_ids: Sequence[int]
    start: int
    table: Sequence[int]  # the sequence's block table
    sample: bool  # sample the next token from the chunk's last position (a prompt's last chunk)


class DecodeRunner:
    """Runs steps against the paged cache: `run` is the worker's step (decode tokens, recomputes
    and prompt chunks in one forward); `prefill` and `step` run one kind alone."""

    def __init__(
        self, model: CausalLM, kv_cache: torch.Tensor, block_size: int, device: torch.device
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache  # [layers, 2, num_blocks, block_size, kv_heads, head_dim]
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()

    def _slots(self, table: Sequence[int], positions: range) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    @torch.inference_mode()
    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        tables: Sequence[Sequence[int]],
        rows: Sequence[SamplingRow] | None = None,
    ) -> SamplerOutput | None:
        """Write the K/V of ``prompts`` into their blocks; with ``rows``, sample each one's next
        token from its last position (colocated prefill)."""
        seq_lens = [len(p) for p in prompts]
        dev = self.device
        ids = torch.tensor([t for p in prompts for t in p], device=dev)
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(dev)
        slots = [x for t, n in zip(tables, seq_lens) for x in self._slots(t, range(n))]
        meta = PrefillMetadata(seq_lens, torch.tensor(slots, device=dev))
        hidden = self.model(ids, positions, meta, self.kv_cache)
        if rows is None:
            return None
        last = torch.tensor(seq_lens, device=dev).cumsum(0) - 1
        return self.sampler(self.model.compute_logits(hidden.index_select(0, last)), rows)

    @torch.inference_mode()
    def step(
        self,
        seqs: Sequence[DecodeSeq],
        tables: Sequence[Sequence[int]],
        rows: Sequence[SamplingRow],
    ) -> SamplerOutput:
        """Cache each seq's last token and sample its next one."""
        meta = self._decode_metadata(seqs, tables)
        ids = torch.tensor([s.token_ids[-1] for s in seqs], device=self.device)
        positions = torch.tensor([len(s.token_ids) - 1 for s in seqs], device=self.device)
        hidden = self.model(ids, positions, meta, self.kv_cache)
        return self.sampler(self.model.compute_logits(hidden), rows)

    @torch.inference_mode()
    def run(
        self,
        seqs: Sequence[DecodeSeq],
        tables: Sequence[Sequence[int]],
        chunks: Sequence[ChunkInput],
        rows: Sequence[SamplingRow],
    ) -> SamplerOutput | None:
        """One engine step in one forward: a decode step for ``seqs`` and the ``chunks``.

        ``rows`` sample the seqs' next tokens, then those of the chunks with ``sample`` set, in
        order; None when there is nothing to sample.
        """
        dev = self.device
        ids = [s.token_ids[-1] for s in seqs] + [t for c in chunks for t in c.token_ids]
        positions = [len(s.token_ids) - 1 for s in seqs]
        positions += [p for c in chunks for p in range(c.start, c.start + len(c.token_ids))]
        spans = [range(c.start, c.start + len(c.token_ids)) for c in chunks]
        meta = MixedMetadata(
            decode=self._decode_metadata(seqs, tables) if seqs else None,
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
        if not rows:
            return None
        # logits rows: every decode token, then the last token of each sampled chunk
        ends = torch.tensor([len(c.token_ids) for c in chunks], dtype=torch.int64).cumsum(0)
        picked = [len(seqs) + int(e) - 1 for c, e in zip(chunks, ends) if c.sample]
        index = torch.tensor([*range(len(seqs)), *picked], dtype=torch.int64, device=dev)
        return self.sampler(self.model.compute_logits(hidden.index_select(0, index)), rows)

    def _decode_metadata(
        self, seqs: Sequence[DecodeSeq], tables: Sequence[Sequence[int]]
    ) -> DecodeMetadata:
        positions = [len(s.token_ids) - 1 for s in seqs]
        width = max(len(t) for t in tables)
        padded = [list(t) + [0] * (width - len(t)) for t in tables]
        dev = self.device
        return DecodeMetadata(
            block_tables=torch.tensor(padded, dtype=torch.int64, device=dev),
            context_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(
                [self._slots(t, range(p, p + 1))[0] for t, p in zip(tables, positions)],
                dtype=torch.int64,
                device=dev,
            ),
        )
