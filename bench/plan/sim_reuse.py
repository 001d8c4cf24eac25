"""Prefix reuse in the simulator: prompts as token ids that share exactly what the workload's
shapes share, the prefill instance's prefix cache, and the reuse totals of a run.

Token ids: every request's own text gets ids no other request has; a shape of a group
(`shared_len` > 0) starts with its group's ids; a later turn of a conversation is the turn it
follows, that turn's answer, and its own message. The simulated decode emits token 0 for every
output token, so a turn's history holds its answers as 0s: exactly the tokens the decode engine
registered for them, as a real answer re-sent in the next prompt hashes like the KV decode
computed for it. Hits then come from the production hash chain (`engine.prefix_hash`) in the
decode engine and the prefill cache alike.

The prefill pool's cache is modelled, not run: each instance keeps an LRU of block hashes of the
prompts it prefilled, `capacity` blocks (by default the spec's `prefill.kv_cache`); a prompt computes only the tokens past its longest cached run of leading blocks (at
least its last token, whose logits give the first token). Prompts in one batch do not see each
other's blocks.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.bench.serve.workloads import RequestShape
from pdserve.engine.prefix_hash import block_hashes, hash_salt

ANSWER_TOKEN = 0  # what the simulated decode samples
SALT = hash_salt("simulated", "auto", 0)  # one model, one KV format: one chain root


def prompt_ids(shapes: Sequence[RequestShape]) -> list[tuple[int, ...]]:
    """Token ids per shape, sharing what the shapes share (see the module docstring)."""
    fresh = itertools.count(1)  # never ANSWER_TOKEN

    def new(n: int) -> tuple[int, ...]:
        return tuple(itertools.islice(fresh, max(n, 0)))

    groups: dict[int, tuple[int, ...]] = {}
    out: list[tuple[int, ...]] = []
    for s in shapes:
        if s.follows is not None:
            prev, answer = out[s.follows], shapes[s.follows].output_len
            head = prev + (ANSWER_TOKEN,) * answer
        elif s.group >= 0 and s.shared_len > 0:
            head = groups.setdefault(s.group, new(s.shared_len))
        else:
            head = ()
        ids = head[: s.input_len] + new(s.input_len - len(head))
        out.append(ids)
    return out


class PrefixLRU:
    """One prefill instance's cached blocks, by chained hash, least recently used first."""

    def __init__(self, capacity: int, block_size: int) -> None:
        self.capacity, self.block_size = capacity, block_size
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def hashes(self, prompt: Sequence[int]) -> list[int]:
        return block_hashes(prompt, self.block_size, SALT) if self.capacity > 0 else []

    def cached_tokens(self, hashes: Sequence[int], prompt_len: int) -> int:
        """Leading prompt tokens found (their blocks become the most recently used), short of
        the last token, which is always computed."""
        found = 0
        for h in hashes:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            found += 1
        return min(found * self.block_size, prompt_len - 1)

    def add(self, hashes: Sequence[int]) -> None:
        """A prefilled prompt's full blocks are cached now; the least recently used go."""
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


@dataclass(frozen=True)
class ReuseTotals:
    """What a simulated run computed and moved, summed over its successful requests."""

    prompt_tokens: int
    prefill_computed: int  # prompt tokens a prefill (pool or colocated) computed
    decode_cached: int  # prompt tokens the decode replica held already (KV not sent)
    kv_sent_bytes: int
    kv_reused_bytes: int

    @property
    def prefill_cached(self) -> int:
        return self.prompt_tokens - self.prefill_computed

    def to_json(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens_computed": self.prefill_computed,
            "prefill_tokens_cached": self.prefill_cached,
            "decode_cached_tokens": self.decode_cached,
            "kv_sent_bytes": self.kv_sent_bytes,
            "kv_reused_bytes": self.kv_reused_bytes,
        }
