"""Draft-model speculation: a small model on the decode replica proposes the next k tokens.

The draft keeps its own paged KV cache and `BlockManager`, keyed by the engine's seq ids, and
per sequence the tokens whose KV that cache holds. Each `propose` call first catches every
sequence up (one forward of prompt-chunk-like spans: the tokens the draft has not seen, the
whole prompt the first time, since the prefill ran the target only), takes the greedy argmax
of each span's last position as draft 1, then runs k - 1 batched single-token decode steps.
Drafts are greedy, so they are a deterministic function of the tokens (the acceptance rule in
engine/speculative.py needs that). Rejected drafts' KV is dropped lazily: the next call keeps
only the common prefix of what is cached and the sequence's tokens.

The draft's cache is a cache: a sequence's draft KV may be evicted (least recently used first)
to make room for another, and is recomputed from its tokens when it is next asked for.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from pdserve.engine.attention import DecodeMetadata, MixedMetadata
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup


class DraftModelProposer:
    """The engine's `Proposer` for ``decode.speculative.method: draft``: greedy drafts from
    ``model`` over its own cache of ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_dtype: str = "auto",
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kv_cache = allocate_kv_cache(model.config, 1, num_blocks, block_size, device, kv_dtype)
        self.blocks = BlockManager(num_blocks, block_size)
        # seq id -> the tokens whose KV the draft cache holds (positions 0..len-1), least
        # recently used first: the order evictions follow
        self._cached: OrderedDict[int, list[int]] = OrderedDict()

    def lookahead(self, seq_id: int, token_ids: Sequence[int], k: int) -> int:
        """k if the draft cache can hold what proposing k drafts computes (the tokens and
        drafts 1..k-1), taking the blocks now; else 0. Idle sequences' KV is evicted for it."""
        return k if k >= 1 and self._reserve(seq_id, token_ids, len(token_ids) + k - 1) else 0

    @torch.inference_mode()
    def propose(self, wanted: Sequence[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        """k greedy drafts for each (seq id, tokens so far, k); [] for a sequence whose room
        was taken by another since its `lookahead` (the engine then verifies no drafts)."""
        runs = [
            (i, sid, tokens, k)
            for i, (sid, tokens, k) in enumerate(wanted)
            if k >= 1 and self._reserve(sid, tokens, len(tokens) + k - 1, evict=False)
        ]
        drafts: list[list[int]] = [[] for _ in wanted]
        if not runs:
            return drafts
        tables = [self.blocks.block_table(sid) for _, sid, _, _ in runs]
        # catch-up: each sequence's uncached tail (at least its last token) as one chunk
        starts = [min(_common(self._cached[sid], tokens), len(tokens) - 1)
                  for _, sid, tokens, _ in runs]  # fmt: skip
        spans = [range(s, len(tokens)) for s, (_, _, tokens, _) in zip(starts, runs)]
        meta = MixedMetadata(
            decode=None,
            chunk_starts=starts,
            chunk_lens=[len(r) for r in spans],
            chunk_tables=tables,
            chunk_slots=self._slots(tables, spans),
        )
        ids = [t for s, (_, _, tokens, _) in zip(starts, runs) for t in tokens[s:]]
        ends = torch.tensor([len(r) for r in spans]).cumsum(0) - 1
        last = self._greedy(ids, [p for r in spans for p in r], meta, ends.tolist())
        for (i, sid, tokens, _), token in zip(runs, last):
            drafts[i].append(token)
            self._cached[sid] = list(tokens)
        # k - 1 more steps, one token per sequence still wanting drafts
        for step in range(1, max(k for *_, k in runs)):
            live = [j for j, (*_, k) in enumerate(runs) if k > step]
            positions = [len(runs[j][2]) + step - 1 for j in live]  # where the last draft goes
            inputs = [drafts[runs[j][0]][-1] for j in live]
            width = max(len(tables[j]) for j in live)
            meta_d = DecodeMetadata(
                block_tables=torch.tensor(
                    [tables[j] + [0] * (width - len(tables[j])) for j in live],
                    dtype=torch.int64,
                    device=self.device,
                ),
                context_lens=torch.tensor(
                    [p + 1 for p in positions], dtype=torch.int64, device=self.device
                ),
                slot_mapping=self._slots(
                    [tables[j] for j in live], [range(p, p + 1) for p in positions]
                ),
            )
            out = self._greedy(inputs, positions, meta_d, list(range(len(live))))
            for j, token, fed in zip(live, out, inputs):
                drafts[runs[j][0]].append(token)
                self._cached[runs[j][1]].append(fed)  # its KV is now in the cache
        return drafts

    def forget(self, seq_id: int) -> None:
        """``seq_id`` is gone: free its draft blocks."""
        self.blocks.free(seq_id)
        self._cached.pop(seq_id, None)

    @property
    def num_seqs(self) -> int:
        """Sequences whose draft KV is held."""
        return len(self._cached)

    # -- internals --------------------------------------------------------------------------

    def _reserve(
        self, seq_id: int, tokens: Sequence[int], num_tokens: int, evict: bool = True
    ) -> bool:
        """Keep the valid prefix of ``seq_id``'s draft KV and grow its blocks to ``num_tokens``
        tokens, evicting least recently used other sequences if ``evict``; False if no room."""
        cached = self._cached.get(seq_id)
        if cached is None:
            cached = self._cached[seq_id] = []
        self._cached.move_to_end(seq_id)
        valid = _common(cached, tokens)
        del cached[valid:]
        if seq_id in self.blocks:
            self.blocks.truncate(seq_id, valid)
        else:
            self.blocks.allocate(seq_id, 0)
        while not self.blocks.can_append(seq_id, num_tokens):
            victim = next(iter(self._cached))
            if not evict or victim == seq_id:
                return False
            self.forget(victim)
        self.blocks.append(seq_id, num_tokens)
        return True

    def _slots(self, tables: Sequence[Sequence[int]], spans: Sequence[range]) -> torch.Tensor:
        bs = self.block_size
        slots = [t[p // bs] * bs + p % bs for t, r in zip(tables, spans) for p in r]
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def _greedy(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        meta: MixedMetadata | DecodeMetadata,
        rows: Sequence[int],
    ) -> list[int]:
        """One forward of ``ids`` at ``positions``; the argmax token at each of ``rows``."""
        dev = self.device
        hidden = self.model(
            torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta, self.kv_cache
        )
        index = torch.tensor(rows, dtype=torch.int64, device=dev)
        logits = self.model.compute_logits(hidden.index_select(0, index))
        return [int(t) for t in logits.argmax(dim=-1).tolist()]


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def build_draft_proposer(
    path: str,
    num_layers: int | None,
    target: CausalLM,
    num_blocks: int,
    block_size: int,
    device: torch.device,
) -> DraftModelProposer:
    """Load the draft at ``path`` (a model directory or GGUF file, as the target loads) in the
    target's dtype, keep its first ``num_layers`` decoder layers (None: all), and wrap it in a
    proposer with a cache of ``num_blocks`` blocks. The draft must share the target's vocab."""
    config = ModelConfig.from_pretrained(path, device=device.type)
    if config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"draft model {path} has vocab_size {config.vocab_size} but the target "
            f"{target.config.path} has {target.config.vocab_size}: they must share a tokenizer"
        )
    if num_layers is not None and not 1 <= num_layers <= config.num_layers:
        raise ValueError(
            f"draft_num_layers={num_layers} must be between 1 and {path}'s {config.num_layers}"
        )
    config = dataclasses.replace(config, dtype=target.config.dtype)
    # the whole checkpoint loads (the loader checks every tensor is used), then layers go
    model = load_model(config, TPGroup.single(), device)
    if num_layers is not None and num_layers < config.num_layers:
        model.layers = nn.ModuleList(list(model.layers)[:num_layers])
        model.config = dataclasses.replace(config, num_layers=num_layers)
    return DraftModelProposer(model, num_blocks, block_size, device)
