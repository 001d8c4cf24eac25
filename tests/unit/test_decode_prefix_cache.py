"""Prefix caching in the decode engine without a model: reservations that hit, what the
transfer must still bring, references released exactly once on every exit, blocks filled by
decode becoming hits, recompute and colocated prefill skipping cached blocks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from _colocated import ColocatedEngine

from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.step import EngineLimits, Output, StepBatch
from pdserve.engine.request import DecodeRequest, Reservation, StepDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplerOutput

BS = 4
HEADS = 2
BLOCK_BYTES = 1000
PREFIX = tuple(range(100, 108))  # two full blocks


class Sevens:
    """Samples 7 for every row; records the batches; raises while ``fail`` is set."""

    def __init__(self) -> None:
        self.batches: list[StepBatch] = []
        self.fail = False

    def run(self, batch: StepBatch) -> SamplerOutput | None:
        if self.fail:
            raise RuntimeError("forward exploded")
        self.batches.append(batch)
        n = len(batch.rows)
        return SamplerOutput([7] * n, [None] * n) if n else None


def make_engine(num_blocks: int = 16, caching: bool = True) -> tuple[DecodeEngine, Sevens]:
    runner = Sevens()
    limits = EngineLimits(
        num_blocks=num_blocks, block_size=BS, max_model_len=4 * num_blocks, num_kv_heads=HEADS,
        max_num_seqs=4, prefix_caching=caching, prefix_salt=12345, block_bytes=BLOCK_BYTES,
    )  # fmt: skip
    return DecodeEngine(runner, limits), runner


def request(tid: int, prompt: tuple[int, ...], max_tokens: int = 4) -> DecodeRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return DecodeRequest(tid, f"r{tid}", prompt, params)


def reserve(engine: DecodeEngine, tid: int, prompt: tuple[int, ...], **kw: int) -> Reservation:
    res = engine.reserve(request(tid, prompt, **kw))
    assert res is not None
    engine.check_integrity()
    return res


def land(engine: DecodeEngine, tid: int, sent_blocks: int) -> list[Output]:
    """Both head slices of the blocks that were sent, and the first token."""
    half = sent_blocks * BLOCK_BYTES // 2
    return engine.kv_landed(tid, 1, half, 0.01, None) + engine.kv_landed(tid, 1, half, 0.01, 5)


def drain(engine: DecodeEngine) -> dict[int, list[StepDelta]]:
    out: dict[int, list[StepDelta]] = {}
    for _ in range(200):
        if not engine.has_work:
            return out
        for tid, delta in engine.step():
            out.setdefault(tid, []).append(delta)
        engine.check_integrity()
    raise AssertionError("the engine does not make progress")


def assert_idle(engine: DecodeEngine) -> None:
    assert engine.check_integrity() == 0
    b = engine.blocks
    assert b.num_free_blocks == b.num_blocks
    assert all(b.ref_count(x) == 0 for x in range(b.num_blocks))


def test_a_shared_prefix_is_reserved_from_the_cache_and_not_sent() -> None:
    engine, _ = make_engine()
    first = reserve(engine, 1, (*PREFIX, 1, 2), max_tokens=10)
    assert first.cached_blocks == 0
    land(engine, 1, 3)  # its KV is in: the two full blocks join the cache
    res = reserve(engine, 2, (*PREFIX, 3, 4, 5))
    assert res.cached_blocks == 2 and res.block_ids[:2] == first.block_ids[:2]
    assert not set(res.block_ids[2:]) & set(first.block_ids)
    # the transfer brings the blocks past the cached prefix, and exactly those
    assert engine.expects_kv(2, res.block_ids[2:], first_block=2)
    assert not engine.expects_kv(2, res.block_ids, first_block=0)
    [(_, delta)] = land(engine, 2, 1)
    assert (delta.kv_bytes, delta.kv_reused_bytes) == (BLOCK_BYTES, 2 * BLOCK_BYTES)
    assert (engine.prefix.queries, engine.prefix.hits) == (10 + 11, 8)
    drain(engine)
    assert_idle(engine)


def test_a_whole_cached_prompt_needs_no_kv_only_its_first_token() -> None:
    engine, _ = make_engine()
    reserve(engine, 1, PREFIX)
    land(engine, 1, 2)
    res = reserve(engine, 2, PREFIX)
    assert res.cached_blocks == 2 == len(res.block_ids)
    assert engine.expects_kv(2, (), first_block=2)
    [(_, delta)] = land(engine, 2, 0)  # the headers and the trailer, no blocks
    assert (delta.kv_bytes, delta.kv_reused_bytes) == (0, 2 * BLOCK_BYTES)
    out = drain(engine)
    assert [t for d in out[2] for t in d.token_ids] == [7, 7, 7]  # decode writes a new block
    assert_idle(engine)


def _abort_reserved(e: DecodeEngine) -> None:
    e.abort(2, kv_pending=False)


def _abort_kv_pending(e: DecodeEngine) -> None:
    assert e.abort(2, kv_pending=True) == []
    land(e, 2, 1)


def _kv_failed(e: DecodeEngine) -> None:
    e.kv_failed(2, "link down")


def _abort_running_mid_step(e: DecodeEngine) -> None:
    land(e, 2, 1)
    step = e.plan()
    assert step is not None and e.abort(2, kv_pending=False) == []
    assert e.runner is not None
    e.commit(step, e.runner.run(e.prepare(step)))


def _failed_step(e: DecodeEngine) -> None:
    land(e, 2, 1)
    assert isinstance(e.runner, Sevens)
    e.runner.fail = True
    e.step()
    e.runner.fail = False


def _finished(e: DecodeEngine) -> None:
    land(e, 2, 1)
    while 2 in e.blocks:
        e.step()


@pytest.mark.parametrize(
    "exit_path",
    [_abort_reserved, _abort_kv_pending, _kv_failed, _abort_running_mid_step, _failed_step,
     _finished],
)  # fmt: skip
def test_every_exit_releases_the_shared_blocks_exactly_once(
    exit_path: Callable[[DecodeEngine], None],
) -> None:
    engine, _ = make_engine()
    holder = reserve(engine, 1, (*PREFIX, 1), max_tokens=60)
    land(engine, 1, 3)
    shared = holder.block_ids[:2]
    res = reserve(engine, 2, (*PREFIX, 2), max_tokens=3)
    assert res.cached_blocks == 2 and [engine.blocks.ref_count(b) for b in shared] == [2, 2]
    exit_path(engine)
    assert not engine.knows(2) and 2 not in engine.blocks
    held = int(engine.knows(1))  # a failed forward fails the holder too: it was in the step
    assert held == (exit_path is not _failed_step)
    assert [engine.blocks.ref_count(b) for b in shared] == [held, held]
    assert engine.check_integrity() == held
    engine.abort(1, kv_pending=False)
    assert_idle(engine)
    assert engine.blocks.cached_prefix(engine.prefix.prompt_hashes(PREFIX)) == 2  # kept


def test_preemption_releases_the_shared_blocks_once_and_the_recompute_hits_them() -> None:
    engine, runner = make_engine(num_blocks=5)
    reserve(engine, 1, (*PREFIX, 1), max_tokens=30)
    land(engine, 1, 3)
    res = reserve(engine, 2, (*PREFIX, 2), max_tokens=30)
    land(engine, 2, 1)
    shared = res.block_ids[:2]
    while not engine.num_preemptions:  # at 12 tokens each, seq 2 has no block to grow into
        engine.step()
    assert engine.knows(2) and 2 not in engine.blocks  # preempted: waits without blocks
    assert [engine.blocks.ref_count(b) for b in shared] == [1, 1]
    assert engine.check_integrity() == 2
    out = drain(engine)  # seq 1 finishes at max_model_len; seq 2 comes back on the prefix
    assert [(c.start, len(c.token_ids)) for b in runner.batches for c in b.chunks] == [(8, 4)]
    assert out[2][-1].finish_reason == "length"
    assert_idle(engine)


def test_blocks_filled_by_decode_are_hits_for_the_next_turn() -> None:
    engine, _ = make_engine()
    reserve(engine, 1, PREFIX[:6], max_tokens=8)
    land(engine, 1, 2)
    out = drain(engine)
    answer = [t for d in out[1] for t in d.token_ids]
    assert answer == [7] * 7  # after the first token 5 (streamed by the prefill)
    conversation = (*PREFIX[:6], 5, *answer)  # 14 tokens: 13 cached when it finished
    res = reserve(engine, 2, (*conversation[:12], 42))
    assert res.cached_blocks == 3  # the prompt's block and two filled while decoding
    engine.abort(2, kv_pending=False)
    assert_idle(engine)


def test_a_preempted_seq_recomputes_only_what_is_not_cached() -> None:
    engine, runner = make_engine(num_blocks=6)
    reserve(engine, 1, tuple(range(8)), max_tokens=8)
    reserve(engine, 2, tuple(range(50, 58)), max_tokens=12)
    land(engine, 1, 2)
    land(engine, 2, 2)
    out = drain(engine)
    assert engine.num_preemptions == 1
    # seq 2 lost its blocks at 12 cached tokens; its prompt's two blocks stayed cached (its
    # third, the least recently released, went to seq 1) and are not recomputed
    recomputes = [c for b in runner.batches for c in b.chunks]
    assert [(c.start, len(c.token_ids)) for c in recomputes] == [(8, 4)]
    assert sum(len(d.token_ids) for d in out[2]) == 11
    assert_idle(engine)


@pytest.mark.parametrize("chunked", [False, True])
def test_colocated_prefill_computes_only_the_uncached_suffix(chunked: bool) -> None:
    engine = ColocatedEngine(budget=64, chunked=chunked, prefix_caching=True)
    engine.submit(1, list(range(10)), max_tokens=2)
    engine.run()
    engine.submit(2, [*range(8), 99, 98], max_tokens=2)  # two cached blocks
    engine.submit(3, list(range(8)), max_tokens=2)  # all cached: the last block is computed
    records = engine.run()
    chunks = [(c.seq_id, c.start, c.end) for r in records for c in r.chunks]
    assert chunks == [(2, 8, 10), (3, 4, 8)]
    assert engine.outputs[2] == engine.outputs[3] == [7, 7]
    stats = engine.engine.prefix
    assert (stats.queries, stats.hits) == (10 + 10 + 8, 8 + 4)


def test_without_prefix_caching_nothing_is_shared() -> None:
    engine, _ = make_engine(caching=False)
    reserve(engine, 1, PREFIX)
    land(engine, 1, 2)
    res = reserve(engine, 2, PREFIX)
    assert res.cached_blocks == 0 and not set(res.block_ids) & set(engine.blocks.block_table(1))
    assert engine.blocks.num_cached_blocks == 0 and engine.prefix.queries == 0
    land(engine, 2, 2)
    drain(engine)
    assert_idle(engine)
