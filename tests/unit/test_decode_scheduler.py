"""DecodeScheduler: admission, continuous batching, preemption/recompute, aborts, self-check."""

from __future__ import annotations

import random

import pytest
from _scheduler_helpers import admit, create_scheduler, create_seq, ids, step

from pdserve.decode_worker.scheduler import (
    DecodeScheduler,
    PromptTooLongError,
    SchedulerError,
    SeqStatus,
)
from pdserve.engine.block_manager import BlockManager


def test_reserve_then_decode_grows_blocks_one_token_at_a_time() -> None:
    sched = create_scheduler(block_size=4)
    res = sched.reserve(1, 4)
    assert res is not None and len(res.block_ids) == 1 and res.cached_blocks == 0
    blocks = res.block_ids
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
