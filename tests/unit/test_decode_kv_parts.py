"""A decode engine taking a prompt's KV in parts (chunked prefill on the prefill pool): each part
must name blocks of its table past the cached prefix, only the last part of every head slice
(with the first token) starts the request, and an abort mid-parts frees it exactly once."""

from __future__ import annotations

from test_decode_prefix_cache import BLOCK_BYTES, PREFIX, drain, make_engine, request, reserve


def test_only_the_last_part_of_every_head_slice_starts_decoding() -> None:
    engine, _ = make_engine()
    prompt = tuple(range(20))  # 5 blocks
    res = reserve(engine, 1, prompt)
    table = res.block_ids
    assert engine.expects_kv(1, table[:2], 0, last=False)
    assert engine.expects_kv(1, table[2:4], 2, last=False)
    assert not engine.expects_kv(1, table[2:4], 2, last=True)  # a last part reaches the end
    assert not engine.expects_kv(1, table[1:3], 2, last=False)  # not the table's blocks there
    assert engine.expects_kv(1, table[4:], 4, last=True)
    for _ in range(2):  # two head slices, each in three parts
        assert engine.kv_landed(1, 1, 2 * BLOCK_BYTES, 0.01, None, last=False) == []
        assert engine.kv_landed(1, 1, 2 * BLOCK_BYTES, 0.01, None, last=False) == []
    assert engine.kv_landed(1, 1, BLOCK_BYTES, 0.01, None, last=True) == []
    [(tid, first)] = engine.kv_landed(1, 1, BLOCK_BYTES, 0.01, 5, last=True)
    assert tid == 1 and first.kv_bytes == 10 * BLOCK_BYTES
    assert not engine.expects_kv(1, table[4:], 4)  # running: nothing more may land
    drain(engine)
    assert engine.check_integrity() == 0


def test_parts_start_past_the_cached_prefix() -> None:
    engine, _ = make_engine()
    reserve(engine, 1, PREFIX)
    engine.kv_landed(1, 2, 2 * BLOCK_BYTES, 0.01, 5)
    drain(engine)
    res = reserve(engine, 2, (*PREFIX, *range(8)))
    assert res.cached_blocks == 2
    assert not engine.expects_kv(2, res.block_ids[1:3], 1, last=False)  # into a shared block
    assert engine.expects_kv(2, res.block_ids[2:3], 2, last=False)


def test_an_abort_between_parts_frees_once_and_late_parts_are_refused() -> None:
    engine, _ = make_engine()
    res = reserve(engine, 1, tuple(range(20)))
    engine.kv_landed(1, 2, 2 * BLOCK_BYTES, 0.01, None, last=False)
    [(_, delta)] = engine.abort(1, kv_pending=False)
    assert delta.finish_reason == "abort"
    assert not engine.expects_kv(1, res.block_ids[2:4], 2, last=False)
    assert engine.kv_landed(1, 2, BLOCK_BYTES, 0.01, 5) == []
    assert engine.check_integrity() == 0 and engine.blocks.num_free_blocks == 16
    assert engine.reserve(request(2, tuple(range(20)))) is not None  # the blocks serve again
