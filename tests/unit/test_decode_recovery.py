"""The decode engine's side of recovery: a migrated request's replayed tokens are outputs (its
sampling rows, max_tokens and stops go on where the dead replica stopped), and leases free
reservations whose KV never came."""

from __future__ import annotations

from test_decode_engine import ScriptedRunner, assert_idle, drain, land, make_engine, request

from pdserve.engine.request import replay_row
from pdserve.engine.sampling_params import SamplingParams


def test_a_replayed_requests_rows_count_its_replayed_tokens_as_outputs() -> None:
    runner = ScriptedRunner(token=7)
    engine = make_engine(runner)
    req = request(1, n=8, max_tokens=4, num_replayed=2)  # 6 prompt tokens, 2 streamed before
    assert engine.reserve(req) is not None
    land(engine, 1, first=5)
    out = drain(engine)
    tokens = [t for d in out[1] for t in d.token_ids]
    assert tokens == [7] and out[1][-1].finish_reason == "length"  # 2 + first + 1 = max_tokens
    (row,) = runner.batches[0].rows
    assert tuple(row.prompt_token_ids) == tuple(range(10, 16))
    assert tuple(row.output_token_ids) == (16, 17, 5)  # replayed, then the first token here
    assert_idle(engine)


def test_a_colocated_replay_samples_its_first_token_as_output_number_replayed() -> None:
    runner = ScriptedRunner(token=7)
    engine = make_engine(runner)
    req = request(1, n=8, max_tokens=3, local_prefill=True, num_replayed=2)
    assert engine.reserve(req) is not None
    out = drain(engine)
    assert [t for d in out[1] for t in d.token_ids] == [7]  # the third output: max_tokens
    row = runner.batches[0].rows[0]
    assert (len(row.prompt_token_ids), tuple(row.output_token_ids)) == (6, (16, 17))
    assert_idle(engine)


def test_replay_row_splits_outputs_off_the_prompt() -> None:
    params = SamplingParams(max_tokens=5, seed=3)
    row = replay_row(params, (1, 2, 3, 4), 1)
    assert (tuple(row.prompt_token_ids), tuple(row.output_token_ids)) == ((1, 2, 3), (4,))
    assert tuple(replay_row(params, (1, 2), 0).output_token_ids) == ()


def test_a_reservation_whose_kv_never_comes_expires_after_its_lease() -> None:
    engine = make_engine()
    never = lambda tid: False  # noqa: E731
    engine.reserve(request(1), now=0.0)
    engine.reserve(request(2), now=0.0)
    engine.reserve(request(3, local_prefill=True), now=0.0)  # its own steps prefill it
    engine.reserve(request(4), now=0.0)
    land(engine, 4)  # decoding: never expires
    assert engine.expire(9.9, 10.0, never) == []
    out = engine.expire(10.0, 10.0, lambda tid: tid == 2)  # a link writes 2 right now
    assert [tid for tid, _ in out] == [1]
    assert out[0][1].error is not None and "decode.kv_lease_s" in out[0][1].error
    assert engine.leases_expired == 1
    engine.kv_landed(2, 2, 100, 0.1, None, last=False, now=12.0)  # a part: the clock restarts
    assert engine.expire(21.0, 10.0, never) == []
    assert [tid for tid, _ in engine.expire(22.0, 10.0, never)] == [2]
    assert engine.abort(4, False) and engine.abort(3, False)  # still held, freed now
    engine.check_integrity()
    assert_idle(engine)


def test_an_aborted_reservation_awaiting_kv_that_never_comes_expires() -> None:
    engine = make_engine()
    engine.reserve(request(1), now=0.0)
    engine.abort(1, kv_pending=True)  # the router thought KV was on its way; it never came
    assert engine.num_requests == 1
    assert [tid for tid, _ in engine.expire(60.0, 60.0, lambda tid: False)] == [1]
    assert_idle(engine)
