"""Recompute preemption in the decode scheduler: who yields blocks when the cache runs out, and
when a preempted sequence comes back."""

from __future__ import annotations

from _scheduler_helpers import admit, create_scheduler, create_seq, ids, step

from pdserve.decode_worker.scheduler import (
    SeqStatus,
)


def test_newest_running_seq_is_preempted_and_recomputed_later() -> None:
    sched = create_scheduler(num_blocks=4, block_size=4)
    old, new = admit(sched, 1, 3), admit(sched, 2, 3)
    for _ in range(5):
        assert ids(step(sched).decode) == [1, 2]  # tokens 4..8: two blocks each, cache full
    out = step(sched)  # token 9 needs a fifth block: the newer seq gives way
    assert ids(out.decode) == [1] and ids(out.preempted) == [2]
    assert new.status is SeqStatus.PREEMPTED and 2 not in sched.blocks and new.num_cached == 0
    sched.finish(1)
    out = step(sched)
    assert ids(out.recompute) == [2] and out.decode == []
    # blocks for every token but the last; the worker rebuilds them with a prefill
    assert new.num_cached == len(new.token_ids) - 1 == 8
    assert sched.blocks.num_tokens(2) == 8
    assert ids(step(sched).decode) == [2] and new.num_cached == 9
    assert old.status is SeqStatus.FINISHED


def test_ready_seqs_are_evicted_before_running_ones() -> None:
    sched = create_scheduler(num_blocks=4, block_size=4, max_num_seqs=1)
    running = admit(sched, 1, 4)
    step(sched)  # seq 1 runs, holds 2 blocks
    waiting = admit(sched, 2, 8)  # ready but the batch is full; holds 2 blocks
    for _ in range(3):
        step(sched)
    out = step(sched)  # seq 1 needs a third block: the ready seq gives way
    assert ids(out.decode) == [1] and ids(out.preempted) == [2]
    assert waiting.status is SeqStatus.PREEMPTED and running.status is SeqStatus.RUNNING


def test_ready_head_evicts_newer_ready_seqs_when_the_cache_is_all_ready() -> None:
    # nothing runs, each ready seq needs one more block: without eviction nobody could move
    sched = create_scheduler(num_blocks=4, block_size=4)
    first, second = admit(sched, 1, 8), admit(sched, 2, 8)
    out = step(sched)
    assert ids(out.decode) == [1] and ids(out.preempted) == [2]
    assert first.status is SeqStatus.RUNNING and second.status is SeqStatus.PREEMPTED


def test_ready_seq_without_room_keeps_its_transferred_blocks_and_waits() -> None:
    sched = create_scheduler(num_blocks=3, block_size=4)
    admit(sched, 1, 4)
    step(sched)  # seq 1 holds 2 blocks
    waiting = admit(sched, 2, 4)  # its 5th token needs a block nobody below it can give
    out = step(sched)
    assert ids(out.decode) == [1] and out.preempted == []
    assert waiting.status is SeqStatus.READY and len(sched.blocks.block_table(2)) == 1
    sched.finish(1)
    assert ids(step(sched).decode) == [2]


def test_running_seq_gives_way_to_reservations_and_returns_after_they_drain() -> None:
    sched = create_scheduler(num_blocks=3, block_size=4)
    seq = admit(sched, 1, 4)
    for _ in range(4):
        step(sched)  # 8 tokens cached in 2 blocks
    assert sched.reserve(2, 4) is not None  # takes the last block, K/V in flight
    out = step(sched)
    assert ids(out.preempted) == [1] and out.decode == [] and out.recompute == []
    assert sched.num_waiting == 1 and sched.num_running == 0
    assert sched.abort(2)
    out = step(sched)
    assert ids(out.recompute) == [1] and seq.num_cached == 8


def test_a_step_that_preempts_readmits_no_preempted_seq() -> None:
    sched = create_scheduler(num_blocks=6, block_size=4, max_num_seqs=3)
    sched.reserve(1, 4)
    sched.reserve(2, 3)
    sched.reserve(90, 16)  # in-flight K/V fills the rest of the cache
    g, p = create_seq(1, 4), create_seq(2, 3)
    sched.activate(g)
    sched.activate(p)
    assert ids(step(sched).preempted) == [2]  # g needs a block: ready p gives way
    sched.abort(90)
    v = admit(sched, 3, 7)
    sched.reserve(91, 8)  # cache full again
    out = step(sched)
    assert ids(out.decode) == [1, 3] and out.recompute == []  # no room for p
    out = step(sched)  # v needs a block and gives it up itself: 2 blocks free, p needs 1
    assert ids(out.decode) == [1] and ids(out.preempted) == [3]
    assert out.recompute == []  # p would be the next victim: wait a step
    out = step(sched)
    assert ids(out.recompute) == [2] and sched.blocks.num_tokens(2) == 3
    assert v.status is SeqStatus.PREEMPTED and p.status is SeqStatus.RUNNING


def test_recompute_waits_for_room_to_decode_too() -> None:
    # a seq whose next token opens a block is re-admitted only when that block is free too
    sched = create_scheduler(num_blocks=3, block_size=4)
    seq = admit(sched, 1, 4)
    for _ in range(4):
        step(sched)  # 8 tokens cached in 2 blocks
    sched.reserve(2, 4)
    assert ids(step(sched).preempted) == [1]
    sched.abort(2)
    sched.reserve(3, 1)  # 2 blocks free: enough for the 8 cached tokens, not for the 9th
    assert step(sched).recompute == [] and seq.status is SeqStatus.PREEMPTED
    sched.abort(3)
    assert ids(step(sched).recompute) == [1]


def test_preempted_seqs_wait_behind_ready_ones_and_keep_arrival_order() -> None:
    sched = create_scheduler(num_blocks=6, block_size=4, max_num_seqs=4)
    a, b, c = admit(sched, 1, 4), admit(sched, 2, 4), admit(sched, 3, 4)
    for _ in range(4):
        assert ids(step(sched).decode) == [1, 2, 3]  # tokens 5..8: cache full
    out = step(sched)  # token 9: the newest seq gives way, its blocks serve both others
    assert ids(out.decode) == [1, 2] and ids(out.preempted) == [3]
    for _ in range(3):
        step(sched)
    out = step(sched)  # token 13
    assert ids(out.decode) == [1] and ids(out.preempted) == [2]
    assert [b.status, c.status] == [SeqStatus.PREEMPTED] * 2
    sched.finish(1)
    d = admit(sched, 4, 4)
    out = step(sched)
    # the ready seq goes first; then seq 2 (arrived before 3) fits, seq 3 does not
    assert ids(out.decode) == [4] and ids(out.recompute) == [2]
    assert a.status is SeqStatus.FINISHED and d.status is SeqStatus.RUNNING
    assert c.status is SeqStatus.PREEMPTED and sched.num_waiting == 1
