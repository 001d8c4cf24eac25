"""DecodeEngine's verbs without a model: a runner that samples a scripted token per row.

Each scenario ends with the block manager's and scheduler's integrity checked and, when the
engine should be idle, every block free."""

from __future__ import annotations

import pytest

from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.step import EngineLimits, Output, StepBatch
from pdserve.engine.request import DecodeRequest, StepDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplerOutput

EOS = 2
HEADS = 2


class ScriptedRunner:
    """Samples ``token`` for every row; raises while ``fail`` is set."""

    def __init__(self, token: int = 7) -> None:
        self.token = token
        self.fail = False
        self.batches: list[StepBatch] = []

    def run(self, batch: StepBatch) -> SamplerOutput | None:
        if self.fail:
            raise RuntimeError("forward exploded")
        self.batches.append(batch)
        n = len(batch.rows)
        return SamplerOutput([self.token] * n, [None] * n) if n else None


def make_engine(
    runner: ScriptedRunner | None = None, num_blocks: int = 16, chunked: bool = False
) -> DecodeEngine:
    limits = EngineLimits(
        num_blocks=num_blocks, block_size=4, max_model_len=min(64, 4 * num_blocks), num_kv_heads=HEADS,
        eos_token_ids=(EOS,), max_num_seqs=4, max_num_batched_tokens=16, chunked_prefill=chunked,
    )  # fmt: skip
    return DecodeEngine(runner or ScriptedRunner(), limits)


def request(tid: int, n: int = 6, max_tokens: int = 4, **kw: object) -> DecodeRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return DecodeRequest(tid, f"r{tid}", tuple(range(10, 10 + n)), params, **kw)  # type: ignore[arg-type]


def land(engine: DecodeEngine, tid: int, first: int = 5) -> list[Output]:
    """Both KV head slices arrive (rank 1's without the trailer, then rank 0's with it)."""
    return engine.kv_landed(tid, 1, 100, 0.01, None) + engine.kv_landed(tid, 1, 100, 0.02, first)


def drain(engine: DecodeEngine) -> dict[int, list[StepDelta]]:
    out: dict[int, list[StepDelta]] = {}
    for _ in range(100):
        if not engine.has_work:
            return out
        for tid, delta in engine.step():
            out.setdefault(tid, []).append(delta)
    raise AssertionError("the engine does not make progress")


def assert_idle(engine: DecodeEngine) -> None:
    assert engine.check_integrity() == 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_request_lands_when_every_head_and_the_first_token_are_here() -> None:
    engine = make_engine()
    res = engine.reserve(request(1))
    assert res is not None and res.cached_blocks == 0
    blocks = res.block_ids
    assert engine.expects_kv(1, blocks)
    assert not engine.expects_kv(1, [b + 1 for b in blocks])  # someone else's blocks
    assert engine.kv_landed(1, 1, 100, 0.01, None) == []  # one head slice of two
    [(tid, first)] = engine.kv_landed(1, 1, 100, 0.02, 5)
    assert tid == 1 and first.token_ids == []  # disaggregated: prefill streamed token 1
    assert (first.kv_bytes, first.transfer_s) == (200, 0.02)
    assert not engine.expects_kv(1, blocks)  # running: no more KV into its blocks
    deltas = drain(engine)[1]
    assert [d.token_ids for d in deltas] == [[7], [7], [7]]  # 3 more after the first: 4
    assert deltas[-1].finish_reason == "length"
    assert_idle(engine)


def test_eos_stops_and_a_first_token_can_finish_at_once() -> None:
    engine = make_engine(ScriptedRunner(token=EOS))
    engine.reserve(request(1))
    land(engine, 1)
    assert drain(engine)[1][-1].finish_reason == "stop"
    engine.reserve(request(2, max_tokens=1))
    [(_, delta)] = land(engine, 2)
    assert delta.finish_reason == "length"  # the first token was the only one asked for
    assert_idle(engine)


@pytest.mark.parametrize("kv_pending", [False, True])
def test_abort_before_the_kv_lands(kv_pending: bool) -> None:
    engine = make_engine()
    engine.reserve(request(1))
    outputs = engine.abort(1, kv_pending)
    if kv_pending:  # a receiver may be writing the blocks: they stay until the KV is in
        assert outputs == [] and engine.blocks.num_free_blocks < engine.blocks.num_blocks
        outputs = land(engine, 1)
    assert [(t, d.finish_reason) for t, d in outputs] == [(1, "abort")]
    assert_idle(engine)


def test_abort_during_a_step_takes_effect_at_its_commit() -> None:
    runner = ScriptedRunner()
    engine = make_engine(runner)
    engine.reserve(request(1, max_tokens=10))
    land(engine, 1)
    step = engine.plan()
    assert step is not None
    assert engine.abort(1, kv_pending=False) == []  # its blocks are in the running forward
    outputs = engine.commit(step, runner.run(engine.prepare(step)))
    assert [(d.token_ids, d.finish_reason) for _, d in outputs] == [([7], None), ([], "abort")]
    assert_idle(engine)


def test_abort_of_a_colocated_prompt_mid_chunk() -> None:
    runner = ScriptedRunner()
    engine = make_engine(runner, chunked=True)
    engine.reserve(request(1, n=40, local_prefill=True))  # 16-token steps: 3 chunks
    assert engine.step() == []
    step = engine.plan()
    assert step is not None and step.chunks[0].start == 16
    engine.abort(1, kv_pending=False)
    assert [d.finish_reason for _, d in engine.commit(step, None)] == ["abort"]
    assert_idle(engine)


def test_a_failed_forward_fails_its_requests_only() -> None:
    runner = ScriptedRunner()
    engine = make_engine(runner)
    engine.reserve(request(1))
    land(engine, 1)
    engine.reserve(request(2))  # its KV is still on its way
    runner.fail = True
    [(tid, delta)] = engine.step()
    assert tid == 1 and delta.error is not None and "forward exploded" in delta.error
    assert engine.check_integrity() == 1
    runner.fail = False
    land(engine, 2)
    assert drain(engine)[2][-1].finish_reason == "length"
    assert_idle(engine)


def test_kv_failure_and_fail_held() -> None:
    engine = make_engine()
    engine.reserve(request(1))
    engine.reserve(request(2))
    engine.reserve(request(3, local_prefill=True))
    [(tid, delta)] = engine.kv_failed(1, "link down")
    assert tid == 1 and delta.error == "link down"
    land(engine, 2)
    assert engine.kv_failed(2, "late") == []  # running: its KV is all here
    failed = engine.fail_held("bug")
    assert sorted(t for t, _ in failed) == [2, 3]  # running and colocated; none in flight
    assert_idle(engine)


def test_preemption_recomputes_and_frees_everything() -> None:
    runner = ScriptedRunner()
    engine = make_engine(runner, num_blocks=8)  # 32 slots: three 8-token prompts + outputs
    for tid in (1, 2, 3):
        engine.reserve(request(tid, n=8, max_tokens=12))
        land(engine, tid)
    out = drain(engine)
    assert engine.num_preemptions > 0
    assert any(b.chunks for b in runner.batches)  # recomputed
    assert all(sum(len(d.token_ids) for d in out[t]) == 11 for t in (1, 2, 3))
    assert_idle(engine)
