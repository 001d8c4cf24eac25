"""take_batch: token budget, size cap, FCFS, and the over-budget prompt that runs alone."""

from __future__ import annotations

import pytest

from pdserve.engine.batching import take_batch


@pytest.mark.parametrize(
    ("prompt_lens", "max_tokens", "max_size", "taken"),
    [
        ([], 100, 4, 0),  # empty queue
        ([10, 20, 30], 100, 8, 3),  # everything fits
        ([40, 40, 40], 100, 8, 2),  # token budget stops the third
        ([50, 50, 1], 100, 8, 2),  # exactly on budget
        ([10] * 10, 1000, 4, 4),  # size cap
        ([500, 10, 10], 100, 8, 1),  # over-budget head runs alone
        ([10, 500, 10], 100, 8, 1),  # FCFS: never skips past the long one
    ],
)
def test_take_batch(prompt_lens: list[int], max_tokens: int, max_size: int, taken: int) -> None:
    assert take_batch(prompt_lens, max_tokens, max_size) == taken


def test_draining_a_queue_takes_every_prompt_once_in_order() -> None:
    queue = [7, 90, 3, 120, 40, 40, 40, 1]
    batches = []
    while queue:
        n = take_batch(queue, max_batch_tokens=100, max_batch_size=3)
        batches.append(queue[:n])
        queue = queue[n:]
    assert batches == [[7, 90, 3], [120], [40, 40], [40, 1]]


@pytest.mark.parametrize(
    ("tokens", "size", "name"), [(0, 1, "max_batch_tokens"), (1, 0, "max_batch_size")]
)
def test_bad_limits_are_rejected(tokens: int, size: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        take_batch([1], tokens, size)
