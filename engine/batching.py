"""Prefill batching policy: how many queued prompts go into the next prefill batch. Pure."""

from __future__ import annotations

from collections.abc import Sequence


def take_batch(prompt_lens: Sequence[int], max_batch_tokens: int, max_batch_size: int) -> int:
    """How many prompts to take from the head of the FIFO queue `prompt_lens`.

    Takes the longest prefix whose total length fits `max_batch_tokens` and whose size is at most
    `max_batch_size`, but at least 1 when the queue is non-empty: a prompt over the token budget
    runs alone rather than blocking the queue forever. Never skips ahead (FCFS), so a long prompt
    at the head is not starved by short ones behind it.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens={max_batch_tokens} is invalid: must be >= 1")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size} is invalid: must be >= 1")
    taken, tokens = 0, 0
    for length in prompt_lens[:max_batch_size]:
        if taken > 0 and tokens + length > max_batch_tokens:
            break
        taken, tokens = taken + 1, tokens + length
    return taken
