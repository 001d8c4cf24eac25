"""The prefill leader's scheduler without a model: whole prompts and chunks within the budget,
short prompts ahead of a long one's chunks, the prefix cache's hits (never the last position),
the blocks each step sends to decode, and references released exactly once on every exit."""

from __future__ import annotations

import pytest

from pdserve.engine.request import PrefillItem
from pdserve.engine.sampling_params import SamplingParams
from pdserve.prefill_worker.scheduler import PrefillScheduler, PrefillWork

BS = 4
GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


def item(tid: int, prompt: list[int], decode_cached: int = 0) -> PrefillItem:
    blocks = tuple(range(100, 100 + -(-len(prompt) // BS)))
    return PrefillItem(tid, f"r{tid}", tuple(prompt), GREEDY, 0, blocks, decode_cached)


def spans(works: list[PrefillWork]) -> list[tuple[int, int, int]]:
    return [(w.item.transfer_id, w.start, w.end) for w in works]


def run(s: PrefillScheduler) -> tuple[list[PrefillWork], dict[int, int]]:
    works = s.schedule()
    done = s.on_step_done(works)
    s.check_integrity()
    return works, done


def test_whole_prompts_fcfs_within_the_budget_a_longer_one_alone() -> None:
    s = PrefillScheduler(64, BS, max_batch_tokens=16, max_batch_size=8)
    for tid, n in ((1, 10), (2, 5), (3, 30)):
        s.add(item(tid, list(range(n))))
    assert s.queued_tokens == 45
    works, done = run(s)
    assert spans(works) == [(1, 0, 10), (2, 0, 5)] and set(done) == {1, 2}
    works, done = run(s)
    assert spans(works) == [(3, 0, 30)] and done == {3: 0}  # over the budget: alone, whole
    assert s.schedule() == [] and s.check_integrity() == 0


def test_a_cached_prefix_is_not_computed_but_the_last_position_always_is() -> None:
    s = PrefillScheduler(64, BS, 64, 8, caching=True, salt=7)
    prefix = list(range(50, 58))  # two blocks
    s.add(item(1, [*prefix, 1, 2, 3]))
    run(s)
    s.add(item(2, [*prefix, 9, 9]))  # shares two blocks
    s.add(item(3, prefix))  # cached whole: its last block is computed again
    works, done = run(s)
    assert spans(works) == [(2, 8, 10), (3, 4, 8)]
    assert done == {2: 8, 3: 4}
    assert (s.queries, s.hits) == (11 + 10 + 8, 12)
    # the second and third shared the first's blocks, which stay cached
    assert s.blocks.num_cached_blocks == 2 and s.blocks.num_evictable_blocks >= 2


def test_caching_off_shares_nothing() -> None:
    s = PrefillScheduler(64, BS, 64, 8, caching=False)
    s.add(item(1, list(range(8))))
    run(s)
    s.add(item(2, list(range(8))))
    works, done = run(s)
    assert spans(works) == [(2, 0, 8)] and done == {2: 0}
    assert s.blocks.num_cached_blocks == 0 and s.hits == 0


def test_chunks_are_whole_blocks_and_each_sends_the_blocks_it_completes() -> None:
    s = PrefillScheduler(64, BS, max_batch_tokens=10, max_batch_size=8, chunked=True)
    s.add(item(1, list(range(22)), decode_cached=1))  # decode holds block 0
    steps = [run(s)[0][0] for _ in range(3)]
    assert [(w.start, w.end) for w in steps] == [(0, 8), (8, 16), (16, 22)]
    assert [(w.send_start, w.send_end, w.last) for w in steps] == [
        (1, 2, False),
        (2, 4, False),
        (4, 6, True),
    ]
    assert all(w.table == steps[0].table for w in steps)  # one table, held throughout
    assert s.check_integrity() == 0


def test_a_short_prompt_goes_ahead_of_a_long_ones_chunks() -> None:
    s = PrefillScheduler(64, BS, max_batch_tokens=16, max_batch_size=8, chunked=True)
    s.add(item(1, list(range(40))))
    works, _ = run(s)
    assert spans(works) == [(1, 0, 16)]
    s.add(item(2, list(range(7))))  # arrives while the long one is under way
    works, done = run(s)
    assert spans(works) == [(2, 0, 7), (1, 16, 24)] and list(done) == [2]
    finished = []
    while len(s):
        finished += list(run(s)[1])
    assert finished == [1]


def test_short_prompts_leave_a_long_one_its_floor() -> None:
    s = PrefillScheduler(64, BS, max_batch_tokens=16, max_batch_size=8, chunked=True)
    assert s.chunk_floor == BS
    s.add(item(1, list(range(40))))
    run(s)
    for tid in (2, 3, 4):
        s.add(item(tid, list(range(5))))
    works, _ = run(s)
    # 5 + 5 fit 16 - 4; the third would eat the floor: the long one gets its chunk
    assert spans(works) == [(2, 0, 5), (3, 0, 5), (1, 16, 20)]


def test_a_long_waiting_prompt_is_passed_over_not_waited_behind() -> None:
    s = PrefillScheduler(64, BS, max_batch_tokens=16, max_batch_size=8, chunked=True)
    s.add(item(1, list(range(40))))
    s.add(item(2, list(range(6))))
    works, done = run(s)
    assert spans(works) == [(2, 0, 6), (1, 0, 8)] and list(done) == [2]


def test_remove_releases_each_reference_once_at_any_point() -> None:
    s = PrefillScheduler(16, BS, 8, 8, chunked=True, caching=True)
    prefix = list(range(8))
    s.add(item(1, prefix))
    run(s)
    s.add(item(2, [*prefix, *range(20, 40)]))  # shares the first's blocks, then chunks
    s.add(item(3, [1, 2, 3]))
    works, _ = run(s)
    assert s.started(2) and s.blocks.ref_count(works[-1].table[0]) == 1
    assert s.remove(2) and not s.remove(2)
    assert s.remove(3) is False  # it finished in that step already
    assert s.check_integrity() == 0
    assert s.blocks.num_free_blocks == 16  # everything back: free or evictable


def test_a_full_cache_evicts_the_least_recently_released_prefix() -> None:
    s = PrefillScheduler(4, BS, 64, 8, caching=True)
    s.add(item(1, list(range(8))))
    run(s)
    s.add(item(2, list(range(20, 28))))
    run(s)
    assert s.blocks.num_cached_blocks == 4
    s.add(item(3, list(range(40, 48))))  # needs two blocks: the first prompt's go
    run(s)
    s.add(item(4, [*range(20, 28), 5]))
    _, done = run(s)
    assert done == {4: 8}  # the second prompt's blocks survived


def test_a_prompt_the_cache_cannot_hold_is_refused() -> None:
    s = PrefillScheduler(4, BS, 64, 8)
    with pytest.raises(ValueError, match=r"raise prefill\.kv_cache"):
        s.add(item(1, list(range(17))))
    with pytest.raises(ValueError, match="at least the block size"):
        PrefillScheduler(4, BS, 3, 8, chunked=True)
