"""One decode replica's data plane: the model, its paged KV cache, and the step function."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.decode_worker.scheduler import DecodeSeq
from pdserve.engine.attention import DecodeMetadata, PrefillMetadata
from pdserve.engine.model import CausalLM
from pdserve.engine.sampling import Sampler, SamplerOutput, SamplingRow


class DecodeRunner:
    """Runs decode steps (and recompute prefills after preemption) against the paged cache."""

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

    def recompute(self, seqs: Sequence[DecodeSeq], tables: Sequence[Sequence[int]]) -> None:
        """Rebuild the cache of preempted seqs: a prefill over all but their last token."""
        self.prefill([s.token_ids[:-1] for s in seqs], tables)

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
        positions = [len(s.token_ids) - 1 for s in seqs]
        width = max(len(t) for t in tables)
        padded = [list(t) + [0] * (width - len(t)) for t in tables]
        dev = self.device
        meta = DecodeMetadata(
            block_tables=torch.tensor(padded, dtype=torch.int64, device=dev),
            context_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(
                [self._slots(t, range(p, p + 1))[0] for t, p in zip(tables, positions)],
                dtype=torch.int64,
                device=dev,
            ),
        )
        ids = torch.tensor([s.token_ids[-1] for s in seqs], device=dev)
        hidden = self.model(ids, torch.tensor(positions, device=dev), meta, self.kv_cache)
        return self.sampler(self.model.compute_logits(hidden), rows)
