"""DecodeScheduler: admission, continuous batching, preemption/recompute, aborts, self-check."""

from __future__ import annotations

import random

import pytest

from pdserve.decode_worker.scheduler import (
    DecodeScheduler,
    DecodeSeq,
    PromptTooLongError,
    ScheduleOutput,
    SchedulerError,
    SeqStatus,
)
from pdserve.engine.block_manager import BlockManager


def create_scheduler(
    num_blocks: int = 8, block_size: int = 4, max_num_seqs: int = 4, max_model_len: int = 0
) -> DecodeScheduler:
    blocks = BlockManager(num_blocks, block_size)
    return DecodeScheduler(blocks, max_num_seqs, max_model_len or num_blocks * block_size)


def create_seq(seq_id: int, prompt_len: int, max_tokens: int = 100) -> DecodeSeq:
    # prompt + the first token sampled by prefill
    return DecodeSeq(seq_id, prompt_len, max_tokens, token_ids=list(range(prompt_len + 1)))


def admit(sched: DecodeScheduler, seq_id: int, prompt_len: int, max_tokens: int = 100) -> DecodeSeq:
    """Reserve, 'transfer' and activate one seq, as router + worker do."""
    assert sched.reserve(seq_id, prompt_len) is not None
    seq = create_seq(seq_id, prompt_len, max_tokens)
    sched.activate(seq)
    return seq


def step(sched: DecodeScheduler) -> ScheduleOutput:
    """One worker step: schedule, sample a token for each decode seq, report it, finish at limits."""
    out = sched.schedule()
    for seq in out.decode:
        seq.token_ids.append(7)
    sched.on_step_done(out.decode)
    for seq in out.decode:
        if sched.reached_length_limit(seq):
            sched.finish(seq.seq_id)
    sched.check_integrity()
    return out


def ids(seqs: list[DecodeSeq]) -> list[int]:
    return [seq.seq_id for seq in seqs]


def test_reserve_then_decode_grows_blocks_one_token_at_a_time() -> None:
    sched = create_scheduler(block_size=4)
    blocks = sched.reserve(1, 4)
    assert blocks is not None and len(blocks) == 1
    assert (sched.num_reserved, sched.num_running, sched.num_waiting) == (1, 0, 0)
    seq = create_seq(1, 4)
    sched.activate(seq)
    assert seq.status is SeqStatus.READY and seq.num_cached == 4
    out = step(sched)
    assert ids(out.decode) == [1] and seq.num_cached == 5 and seq.num_output == 2
    table = sched.blocks.block_table(1)
    assert table[0] == blocks[0] and len(table) == 2  # token 5 opened a second block
    for _ in range(3):
        step(sched)
    assert seq.num_cached == 8 and len(sched.blocks.block_table(1)) == 2
    sched.finish(1)
    assert sched.blocks.num_free_blocks == 8 and seq.status is SeqStatus.FINISHED
    sched.check_integrity()


def test_reserve_returns_none_without_room_and_rejects_bad_prompts() -> None:
    sched = create_scheduler(num_blocks=2, block_size=4, max_model_len=8)
    assert sched.reserve(1, 5) is not None
    assert sched.reserve(2, 5) is None and sched.num_reserved == 1
    with pytest.raises(PromptTooLongError, match="max_model_len=8"):
        sched.reserve(3, 8)
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        sched.reserve(3, 0)
    with pytest.raises(SchedulerError, match="already known"):
        sched.reserve(1, 1)
    sched.check_integrity()


def test_max_model_len_must_fit_the_cache() -> None:
    with pytest.raises(ValueError, match="more blocks"):
        DecodeScheduler(BlockManager(2, 4), max_num_seqs=1, max_model_len=9)


def test_activate_checks_the_reservation() -> None:
    sched = create_scheduler()
    with pytest.raises(SchedulerError, match="not reserved"):
        sched.activate(create_seq(1, 4))
    sched.reserve(1, 4)
    with pytest.raises(SchedulerError, match="reserved 4"):
        sched.activate(create_seq(1, 5))
    with pytest.raises(SchedulerError, match="finish it"):
        sched.activate(create_seq(1, 4, max_tokens=1))
    sched.check_integrity()


def test_batch_is_capped_and_admits_ready_seqs_fcfs() -> None:
    sched = create_scheduler(num_blocks=16, max_num_seqs=2)
    for seq_id in (5, 3, 9):
        admit(sched, seq_id, 2)
    assert ids(step(sched).decode) == [5, 3] and sched.num_waiting == 1
    sched.finish(5)
    assert ids(step(sched).decode) == [3, 9]


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


@pytest.mark.parametrize("state", ["reserved", "ready", "running", "preempted", "recompute"])
def test_abort_in_every_state_frees_all_blocks(state: str) -> None:
    sched = create_scheduler(num_blocks=4, block_size=4)
    if state == "reserved":
        sched.reserve(1, 5)
    else:
        seq = admit(sched, 1, 4)
        if state != "ready":
            step(sched)
        if state in ("preempted", "recompute"):
            sched.reserve(2, 8)  # in-flight K/V leaves seq 1 no room to grow
            for _ in range(4):
                step(sched)
            assert seq.status is SeqStatus.PREEMPTED
        if state == "recompute":
            sched.abort(2)
            assert ids(step(sched).recompute) == [1]
            sched.reserve(2, 8)
    assert sched.abort(1) and not sched.abort(1)
    assert 1 not in sched.blocks and sched.num_running == sched.num_waiting == 0
    sched.check_integrity()
    sched.abort(2)
    assert sched.blocks.num_free_blocks == 4


def test_finish_of_an_unknown_seq_is_an_error() -> None:
    with pytest.raises(SchedulerError, match="unknown"):
        create_scheduler().finish(42)


def test_protocol_errors_are_caught_before_any_state_changes() -> None:
    sched = create_scheduler()
    seq = admit(sched, 1, 4)
    with pytest.raises(SchedulerError, match="not running"):
        sched.on_step_done([seq])
    out = sched.schedule()
    sched.on_step_done(out.decode)
    with pytest.raises(SchedulerError, match="not scheduled"):
        sched.on_step_done(out.decode)  # twice for one step
    with pytest.raises(SchedulerError, match="append each sampled token"):
        sched.schedule()  # the worker never appended the sampled token
    seq.token_ids.append(7)
    sched.check_integrity()
    assert ids(sched.schedule().decode) == [1]


def test_seq_at_its_length_limit_must_be_finished() -> None:
    sched = create_scheduler(num_blocks=4, block_size=4, max_model_len=8)
    seq = admit(sched, 1, 5)
    step(sched)
    step(sched)  # 8 tokens: the step helper finished it on max_model_len
    assert seq.status is SeqStatus.FINISHED and len(seq.token_ids) == 8
    other = admit(sched, 2, 2, max_tokens=2)
    out = sched.schedule()
    other.token_ids.append(7)
    sched.on_step_done(out.decode)
    assert sched.reached_length_limit(other)
    with pytest.raises(SchedulerError, match="length limit"):
        sched.schedule()


def test_random_operations_keep_integrity_and_always_drain() -> None:
    rng = random.Random(1234)
    for trial in range(20):
        sched = create_scheduler(
            num_blocks=rng.randint(4, 12), block_size=rng.choice((1, 2, 4)), max_num_seqs=3
        )
        reserved: list[int] = []
        next_id = 0
        for _ in range(150):
            op = rng.choice(("reserve", "activate", "step", "step", "abort"))
            if op == "reserve":
                length = rng.randint(1, sched.max_model_len // 2)
                if sched.reserve(next_id, length) is not None:
                    reserved.append(next_id)
                next_id += 1
            elif op == "activate" and reserved:
                seq_id = reserved.pop(rng.randrange(len(reserved)))
                length = sched.blocks.num_tokens(seq_id)
                sched.activate(create_seq(seq_id, length, max_tokens=rng.randint(2, 12)))
            elif op == "step":
                step(sched)
            elif op == "abort" and next_id:
                seq_id = rng.randrange(next_id)
                sched.abort(seq_id)
                reserved = [r for r in reserved if r != seq_id]
            sched.check_integrity()
        for seq_id in reserved:  # transfers land; then everyone must finish
            sched.activate(create_seq(seq_id, sched.blocks.num_tokens(seq_id), max_tokens=4))
        for _ in range(2000):
            if sched.num_running + sched.num_waiting == 0:
                break
            step(sched)
        assert sched.num_running + sched.num_waiting == 0, f"trial {trial} did not drain"
        assert sched.blocks.num_free_blocks == sched.blocks.num_blocks
