"""Colocated scheduling: the step's token budget, decode first, chunks of waiting prompts in
FCFS order, the first token only after the last chunk, and aborts mid-prefill."""

from __future__ import annotations

import pytest
from _colocated import ColocatedEngine

from pdserve.decode_worker.prefill_queue import LocalPrefillQueue, PrefillChunk
from pdserve.decode_worker.seq import SchedulerError
from pdserve.engine.deploy_config import DecodeSettings, step_token_budget


def spans(chunks: list[PrefillChunk]) -> list[tuple[int, int, int]]:
    return [(c.seq_id, c.start, c.end) for c in chunks]


def test_decode_first_then_the_budget_left_goes_to_a_chunk() -> None:
    engine = ColocatedEngine(budget=8)
    engine.submit(1, [1] * 3)
    engine.submit(2, [2] * 3)
    first = engine.step()  # nothing decodes yet: both prompts whole, 6 of 8 tokens
    assert spans(first.chunks) == [(1, 0, 3), (2, 0, 3)] and first.first_tokens == [1, 2]
    engine.submit(3, [3] * 32)
    for start in (0, 6, 12, 18, 24):
        step = engine.step()
        assert step.decode == [1, 2]  # the running seqs decode every step, first
        assert spans(step.chunks) == [(3, start, start + 6)]  # then the 6 tokens left
        assert step.num_tokens == 8
    assert engine.prefills.num_partial == 1
    step = engine.step()
    assert step.decode == [1, 2] and spans(step.chunks) == [(3, 30, 32)]
    assert step.first_tokens == [3]  # sampled from the last chunk, decoded from next step on
    assert engine.step().decode == [1, 2, 3]


def test_a_prompt_longer_than_the_budget_completes_and_samples_once() -> None:
    engine = ColocatedEngine(budget=8)
    engine.submit(1, list(range(20)), max_tokens=3)
    records = engine.run()
    assert [spans(r.chunks) for r in records[:3]] == [[(1, 0, 8)], [(1, 8, 16)], [(1, 16, 20)]]
    assert [r.first_tokens for r in records[:3]] == [[], [], [1]]  # only after the last chunk
    assert [r.decode for r in records[:3]] == [[], [], []]
    assert [r.decode for r in records[3:]] == [[1], [1]]  # the first token came from prefill
    assert engine.outputs[1] == [7, 7, 7]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_started_prompt_continues_ahead_of_later_ones_fcfs() -> None:
    engine = ColocatedEngine(budget=8)
    for seq_id, n in ((1, 10), (2, 3), (3, 4), (4, 2)):
        engine.submit(seq_id, [seq_id] * n)
    assert (engine.prefills.num_partial, engine.prefills.num_waiting) == (0, 4)
    assert spans(engine.step().chunks) == [(1, 0, 8)]
    assert (engine.prefills.num_partial, engine.prefills.num_waiting) == (1, 3)  # 1 is running
    # 1 finishes, 2 fits whole, 3 gets what is left; 4 waits behind 3
    assert spans(engine.step().chunks) == [(1, 8, 10), (2, 0, 3), (3, 0, 3)]
    assert (engine.prefills.num_partial, engine.prefills.num_waiting) == (1, 1)
    step = engine.step()
    assert step.decode == [1, 2] and spans(step.chunks) == [(3, 3, 4), (4, 0, 2)]


def test_decodes_can_use_the_whole_budget() -> None:
    engine = ColocatedEngine(budget=2, max_num_seqs=2)
    engine.submit(1, [1])
    engine.submit(2, [2])
    engine.step()
    engine.submit(3, [3] * 4)
    step = engine.step()
    assert step.decode == [1, 2] and step.chunks == []  # vLLM too: decode comes first
    assert len(engine.prefills) == 1


def test_chunks_per_step_are_capped_by_max_num_seqs() -> None:
    queue = LocalPrefillQueue(max_num_batched_tokens=100, max_num_seqs=2, chunked=True)
    for seq_id in range(4):
        queue.add(seq_id, 5)
    assert spans(queue.schedule(0)) == [(0, 0, 5), (1, 0, 5)]


def test_without_chunking_prefill_has_priority_and_runs_whole_prompts() -> None:
    engine = ColocatedEngine(budget=8, chunked=False)
    engine.submit(1, [1] * 3)
    engine.step()
    engine.submit(2, [2] * 20)  # over the budget: runs alone, whole
    engine.submit(3, [3] * 5)
    engine.submit(4, [4] * 3)
    step = engine.step()
    assert step.decode == [] and spans(step.chunks) == [(2, 0, 20)]  # no decode meanwhile
    step = engine.step()
    assert step.decode == [] and spans(step.chunks) == [(3, 0, 5), (4, 0, 3)]
    assert engine.step().decode == [1, 2, 3, 4]  # queue empty: decode resumes


def test_abort_mid_chunked_prefill_frees_every_block() -> None:
    engine = ColocatedEngine(budget=8, num_blocks=16, block_size=4)
    engine.submit(1, [1] * 3)
    engine.submit(2, [2] * 40)  # 10 blocks reserved, filled 5 tokens a step
    engine.step()
    engine.step()
    assert engine.prefills.num_partial == 1 and engine.scheduler.num_reserved == 1
    engine.abort(2)
    engine.scheduler.check_integrity()
    assert len(engine.prefills) == 0 and engine.scheduler.num_reserved == 0
    assert engine.blocks.owners() == [1]  # only the running seq holds blocks
    engine.abort(1)
    assert engine.blocks.num_free_blocks == 16 and engine.idle


def test_preemption_and_recompute_with_chunked_prefill() -> None:
    # 12 blocks of 4 tokens: two 15-token prompts and their decodes cannot all fit
    engine = ColocatedEngine(budget=6, num_blocks=12, block_size=4, max_model_len=40)
    engine.submit(1, [1] * 15, max_tokens=20)
    engine.submit(2, [2] * 15, max_tokens=20)
    records = engine.run()
    assert engine.preemptions > 0 and any(r.recompute for r in records)
    assert engine.outputs == {1: [7] * 20, 2: [7] * 20}
    assert engine.blocks.num_free_blocks == 12


def test_on_done_rejects_chunks_that_were_not_scheduled() -> None:
    queue = LocalPrefillQueue(8, 4, chunked=True)
    queue.add(1, 20)
    queue.on_done(queue.schedule(0))
    with pytest.raises(SchedulerError, match="not scheduled"):
        queue.on_done([PrefillChunk(1, 0, 8, 20)])  # already done
    with pytest.raises(SchedulerError, match="already queued"):
        queue.add(1, 20)
    assert queue.remove(1) and not queue.remove(1)


def test_step_budget_defaults_and_checks() -> None:
    assert step_token_budget(None, 64, chunked=True) == 2048
    assert step_token_budget(None, 4096, chunked=True) == 4096
    assert step_token_budget(None, 64, chunked=False) == 8192
    assert step_token_budget(16, 8, chunked=True) == 16
    assert step_token_budget(16, 64, chunked=False) == 16  # whole prompts: a long one alone
    with pytest.raises(ValueError, match=r"at least max_num_seqs \(64\)"):
        step_token_budget(32, 64, chunked=True)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1"):
        DecodeSettings(max_num_batched_tokens=0)
