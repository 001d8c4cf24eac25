"""The decode engine's side of prefix caching: which block hashes a request looks up, when a
block's hash is registered, and the hit counters. Pure Python over the `BlockManager`.

A block is registered once it is full of tokens whose KV is known: a prompt's full blocks when
its KV has landed (or the local prefill computed it), a recompute's after its step, and a block
filled by decode steps as it fills (so the next turn of a conversation hits the answer too).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.decode_worker.seq import DecodeSeq
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.prefix_hash import block_hashes


class PrefixCache:
    """Hashes prompts and sequences for one engine's `BlockManager` (whose ``caching`` says
    whether it is on) and counts what reservations found (vLLM's counters, in tokens)."""

    def __init__(self, blocks: BlockManager, salt: int) -> None:
        self.blocks = blocks
        self.salt = salt  # the chain's root: engine.prefix_hash.hash_salt
        self.queries = 0  # prompt tokens looked up at reservation
        self.hits = 0  # of those, tokens whose KV was cached

    @property
    def enabled(self) -> bool:
        return self.blocks.caching

    def prompt_hashes(self, prompt: Sequence[int]) -> list[int]:
        """The chained hashes of the prompt's full blocks ([] when caching is off)."""
        if not self.enabled:
            return []
        return block_hashes(prompt, self.blocks.block_size, self.salt)

    def lookup(self, hashes: Sequence[int], prompt_len: int, local_prefill: bool) -> list[int]:
        """The hashes a reservation looks up. A local prefill must compute at least the last
        position (its logits give the first token), so its hits stop a token short; a prefill
        pool samples the first token itself and every full block may hit."""
        if local_prefill:
            return list(hashes[: (prompt_len - 1) // self.blocks.block_size])
        return list(hashes)

    def count(self, prompt_len: int, cached_blocks: int) -> None:
        if self.enabled:
            self.queries += prompt_len
            self.hits += cached_blocks * self.blocks.block_size

    def on_step(self, decode: Sequence[DecodeSeq], recompute: Sequence[DecodeSeq]) -> None:
        """A step's KV is in the cache: register the blocks it filled (the decode seqs whose
        last block just filled, every recompute)."""
        if not self.enabled:
            return
        bs = self.blocks.block_size
        for seq in decode:  # a block filled (a speculative step may fill one mid-step)
            if seq.num_cached // bs > len(seq.block_hashes):
                self._register(seq)
        for seq in recompute:
            self._register(seq)

    def _register(self, seq: DecodeSeq) -> None:
        """Register ``seq``'s blocks full of cached tokens, extending its hash chain."""
        bs = self.blocks.block_size
        full = seq.num_cached // bs
        chain = seq.block_hashes
        if len(chain) < full:
            parent = chain[-1] if chain else self.salt  # a block's hash chains from the last
            chain += block_hashes(seq.token_ids[len(chain) * bs : full * bs], bs, parent)
        self.blocks.register(seq.seq_id, chain[:full])
