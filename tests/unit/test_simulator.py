"""The simulator on cases small enough to work out by hand (see _sim_profile for the numbers)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from _sim_profile import SHAPE, fit, make_profile, toy_spec

from pdserve.bench.plan.latency_model import PREFILL_FEATURES, TransferModel
from pdserve.bench.plan.placement import Placement
from pdserve.bench.plan.sim_instances import SimRequest, batch_ms
from pdserve.bench.plan.simulator import QUEUE_FULL, PlannedShape, plan_shapes, simulate
from pdserve.bench.serve.runner import BenchConfig, plan_requests
from pdserve.bench.serve.workloads import RequestShape, parse_workload

P1D1 = Placement("disaggregated", 1, 1, 1)
COLO = Placement.colocated(1)
LOOSE = {"ttft": 1e6, "tpot": 1e6}


def run(placement: Placement, *reqs: tuple[float, int, int], **profile_changes):
    """(arrival s, input, output) per request -> records in request order."""
    planned = [PlannedShape(t, RequestShape(i, o)) for t, i, o in reqs]
    profile = make_profile(**profile_changes)
    return simulate(profile, placement, planned, LOOSE).records


def ms(x: float) -> float:
    return round(x * 1e3, 6)


def test_one_request_alone_adds_up() -> None:
    (r,) = run(P1D1, (1.0, 100, 5))
    # TTFT = dispatch 3 + prefill (10 + 0.1 * 100) + return 1
    assert ms(r.ttft_s) == 24.0
    # then KV lands 2 ms after the prefill, 4 decode steps of 5 + 1 ms, return 1
    assert ms(r.e2el_s) == 3 + 20 + 2 + 4 * 6 + 1
    assert r.tpot_s * 1e3 == pytest.approx((50 - 24) / 4)
    assert r.success and r.output_tokens == 5


def test_prompts_queued_behind_a_batch_share_the_next_one_and_the_decode_batch() -> None:
    # A prefills alone (3..23 ms); B and C arrive meanwhile and go in one batch of 200 tokens
    a, b, c = run(P1D1, (0.0, 100, 5), (0.010, 100, 5), (0.011, 100, 5))
    assert ms(a.ttft_s) == 24.0
    assert ms(b.arrival_s + b.ttft_s) == ms(c.arrival_s + c.ttft_s) == 23 + (10 + 20) + 1
    # B and C land at 55 ms (A is done by then) and decode together: 4 steps of 5 + 2 ms
    assert ms(b.arrival_s + b.e2el_s) == 55 + 4 * 7 + 1
    (alone,) = run(P1D1, (0.0, 100, 5))
    # TPOT grows by the fitted per-sequence step cost: +1 ms a step, spread over 4 steps
    assert (b.tpot_s - alone.tpot_s) * 1e3 == pytest.approx(1.0)


def test_decode_step_follows_the_fitted_context_term() -> None:
    decode = fit(("const", "batch", "context_sum"), const=5.0, context_sum=0.01)
    (short,) = run(P1D1, (0.0, 100, 3), decode=decode)
    (long,) = run(P1D1, (0.0, 1000, 3), decode=decode)
    # steps at context 101 then 102 (prompt + tokens so far): 5 + 0.01 * ctx each
    assert ms(short.e2el_s - short.ttft_s) == pytest.approx(2 + (5 + 1.01) + (5 + 1.02) + 0)
    assert (long.tpot_s - short.tpot_s) * 1e3 == pytest.approx(0.01 * 900, rel=0.05)


def test_colocated_instance_delays_decoding_while_it_prefills() -> None:
    # A decodes 10 steps; B arrives at 30 ms. Colocated: B's 20 ms prefill runs before A's
    # next step (prefill priority). Disaggregated: A's steps go on; B only joins the batch.
    colo_a, _ = run(COLO, (0.0, 100, 11), (0.030, 100, 2))
    dis_a, _ = run(P1D1, (0.0, 100, 11), (0.030, 100, 2))
    (alone,) = run(COLO, (0.0, 100, 11))
    assert ms(alone.e2el_s) == 3 + 20 + 10 * 6 + 1  # colocated: no transfer
    assert ms(colo_a.e2el_s) == ms(alone.e2el_s) + 20 + 1  # B's prefill + one shared step
    assert ms(dis_a.e2el_s) == 3 + 20 + 2 + 10 * 6 + 1 + 1
    assert colo_a.tpot_s > dis_a.tpot_s + 0.0015


def test_full_kv_cache_makes_the_next_request_wait_for_blocks() -> None:
    blocks = toy_spec(decode={"kv_cache": {"blocks": 16}})  # 256 tokens: one prompt of 200
    a, b = run(
        P1D1, (0.0, 200, 3), (0.0, 200, 3), spec=blocks, model=replace(SHAPE, max_model_len=256)
    )
    assert ms(a.ttft_s) == 3 + 30 + 1
    # B reserves only when A finishes (3 + 30 + 2 + 2 steps of 6 = 47 ms), then prefills alone
    assert ms(b.ttft_s) == 47 + 30 + 1


def test_admission_bound_fails_requests_like_a_429() -> None:
    bound = toy_spec(router={"max_queued_requests": 1})
    planned = [PlannedShape(0.0, RequestShape(100, 5)) for _ in range(2)]
    result = simulate(make_profile(spec=bound), P1D1, planned, LOOSE)
    assert [r.success for r in result.records] == [True, False]
    assert result.records[1].error == QUEUE_FULL
    assert result.attainment == 0.5  # a failed request meets no SLO


def test_attainment_by_metric_uses_the_bench_definitions() -> None:
    planned = [PlannedShape(0.0, RequestShape(100, 5)), PlannedShape(0.0, RequestShape(100, 1))]
    result = simulate(make_profile(), P1D1, planned, {"ttft": 30.0, "tpot": 6.0})
    a, b = result.records
    assert b.tpot_s == 0.0  # a 1-token output has TPOT 0, as in bench.serve.metrics
    assert ms(a.ttft_s) == 24.0 and a.tpot_s * 1e3 == pytest.approx(6.5)  # TTFT met, TPOT not
    assert ms(b.ttft_s) == 3 + 20 + 20 + 1  # queued behind A's batch: TTFT missed
    assert result.attainment_of("ttft") == result.attainment_of("tpot") == 0.5
    assert result.attainment == 0.0  # neither meets both


def test_two_prefill_instances_split_simultaneous_prompts() -> None:
    a, b = run(Placement("disaggregated", 2, 1, 1), (0.0, 100, 2), (0.0, 100, 2))
    assert ms(a.ttft_s) == ms(b.ttft_s) == 24.0  # least_loaded sends them apart: no batching


def test_unmeasured_tp_degree_is_scaled_from_tp1_and_a_measured_one_is_used() -> None:
    p = make_profile()
    lens = [1000]
    ring = 2 * 1 / 2 * 1000 * SHAPE.hidden_size * SHAPE.dtype_bytes
    allreduce = 2 * SHAPE.num_layers * (0.05 + p.transfer.wire_ms(ring))
    assert p.prefill_ms(lens, 2) == pytest.approx(10 + 100 / 2 + allreduce)
    measured = make_profile(prefill={**p.prefill, 2: fit(PREFILL_FEATURES, const=7.0, tokens=0.06)})
    assert measured.prefill_ms(lens, 2) == pytest.approx(7 + 60)


def test_slow_link_stretches_the_prefill_to_the_last_layer_sent() -> None:
    # 100 tokens of 2 KV heads: bytes per layer = 100 * 2 * 2 * 16 * 4; make each take 10 ms
    per_layer = 100 * SHAPE.kv_bytes_per_token() / SHAPE.num_layers
    p = make_profile(transfer=TransferModel(2.0, per_layer / 10 / 1e6))
    busy = batch_ms(p, [SimRequest(0, 0.0, 100, 2)], tp=1)
    first_ready = 20 * SHAPE.qkv_fraction / SHAPE.num_layers
    assert busy == pytest.approx(first_ready + 8 * 10)
    assert batch_ms(make_profile(), [SimRequest(0, 0.0, 100, 2)], tp=1) == pytest.approx(20)


def test_requests_are_the_bench_runs_requests() -> None:
    workload = parse_workload("uniform:in=10-500,out=5-50")
    config = BenchConfig(workload=workload, request_rate=3.0, num_prompts=50, seed=7,
                         max_model_len=256, burstiness=0.5)  # fmt: skip
    real = plan_requests(config, workload)
    sim = plan_shapes(workload, 50, 3.0, 0.5, 7, 256)
    assert [p.arrival_s for p in sim] == [r.arrival_s for r in real]
    assert [(p.shape.input_len, p.shape.output_len) for p in sim] == [
        (r.input_len, r.output_len) for r in real
    ]


def test_overload_collapses_attainment_and_light_load_meets_it() -> None:
    workload = parse_workload("fixed:in=100,out=10")
    slos = {"ttft": 200.0, "tpot": 20.0}
    light = simulate(make_profile(), P1D1, plan_shapes(workload, 100, 1.0, 1.0, 0, None), slos)
    heavy = simulate(make_profile(), P1D1, plan_shapes(workload, 100, 200.0, 1.0, 0, None), slos)
    assert light.attainment == 1.0
    assert heavy.attainment < 0.5
    assert set(light.breakdown_ms) == {"queue", "prefill", "transfer", "decode"}
    assert light.breakdown_ms["transfer"] == pytest.approx(2.0)


def test_chunked_prefill_runs_prompt_chunks_beside_the_decode_batch() -> None:
    # budget 58 tokens a step. A (50 tokens) decodes from 18 ms in steps of 6; B (100) arrives
    # at 30 ms. Prefill priority stalls A for B's whole 20 ms prefill; chunked runs B in two
    # chunks (57 + 43 tokens) beside A's decode token: steps of 6 + 5.7 and 6 + 4.3 ms.
    budget = {"max_num_seqs": 8, "max_num_batched_tokens": 58}
    whole = toy_spec(mode="colocated", decode=budget)
    whole_a, whole_b = run(COLO, (0.0, 50, 11), (0.030, 100, 2), spec=whole)
    chunked = toy_spec(mode="colocated", decode={**budget, "chunked_prefill": True})
    chunk_a, chunk_b = run(Placement.colocated(1, True), (0.0, 50, 11), (0.030, 100, 2),
                           spec=chunked)  # fmt: skip
    assert ms(whole_a.ttft_s) == ms(chunk_a.ttft_s) == 3 + 15 + 1
    assert ms(whole_b.arrival_s + whole_b.ttft_s) == 36 + 20 + 1
    assert ms(chunk_b.arrival_s + chunk_b.ttft_s) == pytest.approx(36 + 11.7 + 10.3 + 1)
    assert ms(whole_a.e2el_s) == 18 + 3 * 6 + 20 + 7 + 6 * 6 + 1
    assert ms(chunk_a.e2el_s) == pytest.approx(18 + 3 * 6 + 11.7 + 10.3 + 7 + 4 * 6 + 1)
