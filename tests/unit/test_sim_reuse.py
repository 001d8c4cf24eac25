"""The simulator on workloads with reuse: shared token ids, closed-loop turns, prefix-cache hits
on decode (the real engine) and in the prefill pool (an LRU per instance), on and off."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _sim_profile import make_profile, toy_spec

from pdserve.bench.plan.placement import Placement
from pdserve.bench.plan.sim_reuse import ANSWER_TOKEN, PrefixLRU, ReuseTotals, prompt_ids
from pdserve.bench.plan.simulator import PlannedShape, SimResult, plan_shapes, simulate
from pdserve.bench.serve.conversation import EARLIER_TURN_FAILED
from pdserve.bench.serve.workloads import RequestShape, parse_workload
from pdserve.cluster.cli import main

P1D1 = Placement("disaggregated", 1, 1, 1)
COLO = Placement.colocated(1)
LOOSE = {"ttft": 1e6, "tpot": 1e6}
TURNS = "multi-turn:turns=6,system=1024,in=48,out=16"


def run(workload: str, placement: Placement, caching: bool, n: int = 24, rate: float = 2.0,
        **kw: int) -> SimResult:  # fmt: skip
    planned = plan_shapes(parse_workload(workload), n, rate, 1.0, 0, 4096)
    profile = make_profile(spec=toy_spec(prefix_caching=caching))
    return simulate(profile, placement, planned, LOOSE, **kw)  # type: ignore[arg-type]


def test_prompt_ids_share_exactly_what_the_shapes_share() -> None:
    shapes = [
        RequestShape(40, 3, 0, 32),
        RequestShape(40, 3, 0, 32),
        RequestShape(40, 3, 1, 32),
        RequestShape(50, 2, 0, 32, follows=0),
        RequestShape(10, 2),
    ]
    a, b, c, turn, plain = prompt_ids(shapes)
    assert a[:32] == b[:32] and a[32:] != b[32:] and a[:32] != c[:32]
    assert turn[:43] == a + (ANSWER_TOKEN,) * 3 and len(turn) == 50
    assert len(set(plain) & set(a + b + c + turn)) == 0 and ANSWER_TOKEN not in plain


def test_the_prefill_cache_finds_leading_blocks_and_forgets_the_oldest() -> None:
    lru = PrefixLRU(capacity=4, block_size=4)
    first, other = lru.hashes(tuple(range(1, 14))), lru.hashes(tuple(range(100, 113)))
    assert len(first) == 3  # 13 tokens: 3 full blocks
    assert lru.cached_tokens(first, 13) == 0
    lru.add(first)
    assert lru.cached_tokens(first, 13) == 12
    assert lru.cached_tokens(first[:2], 8) == 7  # a prompt cached whole still computes a token
    lru.add(other)  # 6 blocks in 4: the two oldest of `first` go
    assert lru.cached_tokens(first, 13) == 0 and lru.cached_tokens(other, 13) == 12
    assert PrefixLRU(0, 4).hashes((1, 2, 3, 4)) == []


@pytest.mark.parametrize("placement", [P1D1, COLO], ids=["disaggregated", "colocated"])
def test_reuse_on_a_multi_turn_workload_prefills_less_and_answers_sooner(
    placement: Placement,
) -> None:
    on, off = run(TURNS, placement, True), run(TURNS, placement, False)
    assert on.summary.completed == off.summary.completed == 24
    assert on.reuse.prompt_tokens == off.reuse.prompt_tokens  # the same requests
    assert off.reuse.prefill_computed == off.reuse.prompt_tokens and off.reuse.decode_cached == 0
    assert on.reuse.prefill_computed < off.reuse.prompt_tokens / 3  # history and system cached
    assert on.summary.latency["ttft"].median_ms < off.summary.latency["ttft"].median_ms / 2
    if placement is P1D1:
        assert on.reuse.kv_sent_bytes < off.reuse.kv_sent_bytes / 3
        assert on.reuse.kv_reused_bytes > 0 == off.reuse.kv_reused_bytes
    else:
        assert on.reuse.kv_sent_bytes == off.reuse.kv_sent_bytes == 0  # nothing crosses a link


def test_without_a_prefill_cache_only_the_kv_sent_shrinks() -> None:
    on = run(TURNS, P1D1, True, prefill_cache_blocks=0)
    off = run(TURNS, P1D1, False)
    assert on.reuse.prefill_computed == off.reuse.prefill_computed
    assert on.reuse.kv_sent_bytes < off.reuse.kv_sent_bytes / 3


def test_shared_prefix_groups_hit_after_their_first_request() -> None:
    on = run("shared-prefix:groups=2,system=512,in=32,out=4", P1D1, True, n=20, rate=5.0)
    # the prefill cache saves each group's 512 tokens (32 blocks) but for its first request
    assert on.reuse.prefill_cached == 18 * 512


def test_a_turn_arrives_when_the_answer_before_it_is_back() -> None:
    result = run("multi-turn:turns=3,system=64,in=16,out=8", P1D1, True, n=6)
    recs = result.records
    assert all(r.success for r in recs)
    for prev, nxt in ((0, 1), (1, 2), (3, 4), (4, 5)):
        assert recs[nxt].arrival_s == pytest.approx(recs[prev].arrival_s + recs[prev].e2el_s)


def test_a_failed_turn_ends_its_conversation() -> None:
    # the second request is refused (one admitted at a time), so its later turn is never sent
    profile = make_profile(spec=toy_spec(router={"max_queued_requests": 1}))
    shapes = [RequestShape(100, 50), RequestShape(100, 5), RequestShape(120, 5, follows=1)]
    planned = [PlannedShape(t, s) for t, s in zip((0.0, 0.001, 0.0), shapes)]
    recs = simulate(profile, P1D1, planned, LOOSE).records
    assert recs[0].success and "429" in recs[1].error and recs[2].error == EARLIER_TURN_FAILED


def test_plan_finds_more_goodput_with_prefix_caching_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "profile.json"
    make_profile().save(path)
    base = ["plan", "--profile", str(path), "--devices", "2", "--workload",
            "multi-turn:turns=6,system=1024,in=48,out=16", "--goodput", "ttft:100", "tpot:50",
            "--num-prompts", "24", "--rate-range", "0.1", "50"]  # fmt: skip
    best = {}
    for caching in ("on", "off"):
        assert main([*base, "--prefix-caching", caching]) == 0
        printed = capsys.readouterr().out
        found = re.search(r"# best: \S+, ([\d.]+) req/s", printed)
        best[caching] = float(found.group(1)) if found else 0.0
    assert best["on"] > 2 * best["off"]
    assert main([*base, "--prefill-cache-blocks", "-1"]) == 2
    assert "--prefill-cache-blocks -1" in capsys.readouterr().err


def test_cache_aware_routing_keeps_a_conversation_where_its_blocks_are() -> None:
    planned = plan_shapes(parse_workload(TURNS), 48, 4.0, 1.0, 0, 4096)

    def reuse(placement: Placement, policy: str) -> ReuseTotals:
        spec = toy_spec(router={"decode_policy": policy})
        return simulate(make_profile(spec=spec), placement, planned, LOOSE).reuse

    colo, disagg = Placement.colocated(2), Placement("disaggregated", 2, 1, 2)
    assert reuse(colo, "cache_aware").prefill_computed < reuse(colo, "round_robin").prefill_computed
    assert reuse(disagg, "cache_aware").kv_sent_bytes < reuse(disagg, "round_robin").kv_sent_bytes


def test_the_prefill_cache_is_as_big_as_the_specs_prefill_kv_cache() -> None:
    planned = plan_shapes(parse_workload(TURNS), 24, 2.0, 1.0, 0, 4096)
    tiny = make_profile(spec=toy_spec(prefill={"kv_cache": {"blocks": 1}}))
    small = simulate(tiny, P1D1, planned, LOOSE).reuse
    big = simulate(make_profile(), P1D1, planned, LOOSE).reuse
    assert small.prefill_cached < big.prefill_cached / 10
