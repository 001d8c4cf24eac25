"""Colocated mode: the prompts an instance prefills itself, and how much of them each step runs.
Pure Python over plain objects (no torch, no Ray).

Two policies, vLLM's, over one FCFS queue of prompts whose blocks are already reserved:

- **prefill priority** (chunked prefill off): while prompts wait, a step runs whole prompts only
  (as many as fit ``max_num_batched_tokens``; a longer one alone) and no decode;
- **chunked prefill**: a step first decodes every running sequence (one token each), then
  spends what is left of ``max_num_batched_tokens`` on the head of the queue. A prompt that does
  not fit gets a chunk and continues next step, ahead of the prompts behind it; its first token
  is sampled only when its last chunk has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.decode_worker.seq import SchedulerError
from pdserve.engine.batching import take_batch


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions [start, end) of one sequence, computed in one step."""

    seq_id: int
    start: int
    end: int
    prompt_len: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def last(self) -> bool:
        """The prompt is complete after this chunk: sample the first token from it."""
        return self.end == self.prompt_len


@dataclass
class _Prompt:
    prompt_len: int
    computed: int = 0  # prompt positions whose K/V are in the cache
    cached: int = 0  # of those, the ones cached before its prefill began (prefix cache hits)


class LocalPrefillQueue:
    """FCFS queue of reserved prompts awaiting (the rest of) their local prefill.

    Step protocol: ``schedule(num_decode_tokens)`` after the decode scheduler picked the step's
    decode batch (skip the decode batch while ``prefill_only``); run the chunks; then
    ``on_done(chunks)``, which forgets the prompts whose last chunk ran. ``remove`` forgets a
    prompt at any time between steps (abort, failure).
    """

    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int, chunked: bool) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError(
                f"max_num_batched_tokens={max_num_batched_tokens} and max_num_seqs="
                f"{max_num_seqs} must be >= 1"
            )
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.chunked = chunked
        self._prompts: dict[int, _Prompt] = {}  # insertion order = arrival order

    def __len__(self) -> int:
        return len(self._prompts)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._prompts

    @property
    def prefill_only(self) -> bool:
        """Prefill priority: this step runs queued prompts and no decode."""
        return not self.chunked and bool(self._prompts)

    @property
    def num_partial(self) -> int:
        """Prompts whose chunked prefill has started but not finished."""
        return sum(1 for p in self._prompts.values() if p.computed > p.cached)

    @property
    def num_waiting(self) -> int:
        """Prompts whose prefill has not started (vLLM counts them as waiting; a started one
        is running)."""
        return len(self._prompts) - self.num_partial

    def add(self, seq_id: int, prompt_len: int, computed: int = 0) -> None:
        """Queue a prompt whose first ``computed`` positions already have their K/V cached."""
        if seq_id in self._prompts:
            raise SchedulerError(f"seq {seq_id} is already queued for prefill")
        if not 0 <= computed < prompt_len:
            raise ValueError(
                f"prompt_len={prompt_len}, computed={computed} are invalid: need "
                "0 <= computed < prompt_len (the last position is always computed)"
            )
        self._prompts[seq_id] = _Prompt(prompt_len, computed, computed)

    def remove(self, seq_id: int) -> bool:
        """Forget `seq_id` (its blocks are the decode scheduler's to free); False if unknown."""
        return self._prompts.pop(seq_id, None) is not None

    def schedule(self, num_decode_tokens: int) -> list[PrefillChunk]:
        """This step's chunks, in queue order, given the tokens the decode batch already uses."""
        if not self.chunked:  # whole prompts run in steps of their own (see prefill_only)
            return [] if num_decode_tokens else self._whole_prompts()
        budget = self.max_num_batched_tokens - num_decode_tokens
        chunks: list[PrefillChunk] = []
        for seq_id, p in self._prompts.items():
            if budget <= 0 or len(chunks) == self.max_num_seqs:
                break
            n = min(p.prompt_len - p.computed, budget)
            chunks.append(PrefillChunk(seq_id, p.computed, p.computed + n, p.prompt_len))
            budget -= n
        return chunks

    def on_done(self, chunks: Sequence[PrefillChunk]) -> None:
        """The chunks' K/V are cached: advance each prompt, forget the finished ones."""
        for chunk in chunks:
            p = self._prompts.get(chunk.seq_id)
            if p is None or p.computed != chunk.start:
                raise SchedulerError(
                    f"chunk [{chunk.start}, {chunk.end}) of seq {chunk.seq_id} was not scheduled"
                )
            p.computed = chunk.end
            if chunk.last:
                del self._prompts[chunk.seq_id]

    def _whole_prompts(self) -> list[PrefillChunk]:
        """The rest of each prompt at the head of the queue that fits (a cached prefix is not
        computed again)."""
        lens = [p.prompt_len - p.computed for p in self._prompts.values()]
        n = take_batch(lens, self.max_num_batched_tokens, self.max_num_seqs)
        heads = list(self._prompts.items())[:n]
        return [PrefillChunk(s, p.computed, p.prompt_len, p.prompt_len) for s, p in heads]
