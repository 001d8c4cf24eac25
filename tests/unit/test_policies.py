"""Dispatch policies: who gets the request, eligibility by free blocks, ties, bad names."""

from __future__ import annotations

import random

import pytest

from pdserve.router.policies import (
    DECODE_POLICIES,
    PREFILL_POLICIES,
    DecodeLoad,
    PrefillLoad,
    pick_decode,
    pick_prefill,
)


def prefill(instance: int, tokens: int = 0, requests: int = 0) -> PrefillLoad:
    return PrefillLoad(instance, queued_tokens=tokens, queued_requests=requests)


def decode(instance: int, free: int = 10, running: int = 0, waiting: int = 0) -> DecodeLoad:
    return DecodeLoad(instance, free_blocks=free, total_blocks=10, running=running, waiting=waiting)


def random_decode_loads(rng: random.Random) -> list[DecodeLoad]:
    return [
        decode(i, rng.randint(0, 10), rng.randint(0, 6), rng.randint(0, 3))
        for i in rng.sample(range(8), rng.randint(1, 5))
    ]


def test_prefill_round_robin_cycles_in_instance_order() -> None:
    loads = [prefill(2), prefill(0), prefill(1)]
    assert [pick_prefill("round_robin", loads, c) for c in range(5)] == [0, 1, 2, 0, 1]


def test_prefill_least_loaded_counts_tokens_then_requests_then_id() -> None:
    assert pick_prefill("least_loaded", [prefill(0, 500, 1), prefill(1, 100, 9)], 0) == 1
    assert pick_prefill("least_loaded", [prefill(0, 100, 3), prefill(1, 100, 2)], 0) == 1
    assert pick_prefill("least_loaded", [prefill(3, 100, 2), prefill(1, 100, 2)], 0) == 1


def test_prefill_needs_an_instance() -> None:
    with pytest.raises(ValueError, match="empty"):
        pick_prefill("least_loaded", [], 0)


def test_decode_round_robin_skips_full_replicas_without_losing_its_place() -> None:
    loads = [decode(0), decode(1, free=1), decode(2)]
    picks = [pick_decode("round_robin", loads, blocks_needed=2, counter=c) for c in range(4)]
    assert picks == [0, 2, 2, 0]


def test_decode_most_free_blocks_and_fewest_running() -> None:
    loads = [decode(0, free=5, running=1), decode(1, free=8, running=4), decode(2, free=8)]
    assert pick_decode("most_free_blocks", loads, 1, 0) == 1  # tie on 8 -> lower id
    assert pick_decode("fewest_running", loads, 1, 0) == 2
    assert pick_decode("fewest_running", loads, 6, 0) == 2
    assert pick_decode("fewest_running", [decode(4, waiting=3), decode(5, waiting=1)], 1, 0) == 5


@pytest.mark.parametrize("policy", DECODE_POLICIES)
def test_decode_only_picks_replicas_with_room(policy: str) -> None:
    loads = [decode(0, free=3, running=0), decode(1, free=9, running=5)]
    assert pick_decode(policy, loads, 4, counter=0) == 1
    assert pick_decode(policy, loads, 10, counter=0) is None
    assert pick_decode(policy, [], 0, counter=0) is None


def test_unknown_policy_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="least_loaded"):
        pick_prefill("random", [prefill(0)], 0)
    with pytest.raises(ValueError, match="most_free_blocks"):
        pick_decode("random", [decode(0)], 1, 0)
    assert set(PREFILL_POLICIES) == {"round_robin", "least_loaded", "cache_aware"}


def test_negative_blocks_needed_is_rejected() -> None:
    with pytest.raises(ValueError, match="blocks_needed"):
        pick_decode("round_robin", [decode(0)], -1, 0)


def test_cache_aware_decode_follows_the_longest_hit_over_more_free_blocks() -> None:
    loads = [decode(0, free=9), decode(1, free=5, running=2), decode(2, free=7)]
    assert pick_decode("cache_aware", loads, 4, 0, hits={1: 3, 2: 1}) == 1
    assert pick_decode("most_free_blocks", loads, 4, 0) == 0
    # equal hits: the freer of the two
    assert pick_decode("cache_aware", loads, 4, 0, hits={1: 3, 2: 3}) == 2


def test_cache_aware_decode_ignores_a_hit_of_less_than_half_the_prompt() -> None:
    loads = [decode(0, free=10), decode(1, free=8)]
    # a shared first block (a chat template's system prompt) must not pull every request
    assert pick_decode("cache_aware", loads, 8, 0, hits={1: 3}) == 0
    assert pick_decode("cache_aware", loads, 8, 0, hits={1: 4}) == 1
    # the balanced pick holds part of it too: only the difference counts
    assert pick_decode("cache_aware", loads, 8, 0, hits={0: 2, 1: 5}) == 0


def test_cache_aware_decode_balances_load_past_both_thresholds() -> None:
    hits = {1: 8}
    busy = [decode(0, free=10, running=2), decode(1, free=8, running=7)]  # 5 more, 3.5x
    assert pick_decode("cache_aware", busy, 8, 0, hits) == 0
    near = [decode(0, free=10, running=2), decode(1, free=8, running=6)]  # only 4 more
    assert pick_decode("cache_aware", near, 8, 0, hits) == 1
    big = [decode(0, free=10, running=20), decode(1, free=8, running=26)]  # 6 more, but 1.3x
    assert pick_decode("cache_aware", big, 8, 0, hits) == 1


def test_cache_aware_decode_never_picks_a_replica_without_room() -> None:
    loads = [decode(0, free=9), decode(1, free=3)]
    assert pick_decode("cache_aware", loads, 4, 0, hits={1: 4}) == 0


def test_without_hits_cache_aware_picks_as_the_default_policies() -> None:
    """On a workload without reuse it changes nothing: the same replica and instance as
    most_free_blocks and least_loaded for any loads."""
    rng = random.Random(0)
    for _ in range(300):
        loads = random_decode_loads(rng)
        needed = rng.randint(0, 6)
        expected = pick_decode("most_free_blocks", loads, needed, 0)
        assert pick_decode("cache_aware", loads, needed, 0, hits={}) == expected
        pre = [prefill(i, rng.randint(0, 900), rng.randint(0, 4)) for i in range(rng.randint(1, 4))]
        assert pick_prefill("cache_aware", pre, 0, {}) == pick_prefill("least_loaded", pre, 0)


def test_cache_aware_prefill_counts_the_cached_tokens_against_the_queue() -> None:
    loads = [prefill(0, 100), prefill(1, 400)]
    assert pick_prefill("cache_aware", loads, 0, {1: 256}) == 0  # 100 < 400 - 256
    assert pick_prefill("cache_aware", loads, 0, {1: 320}) == 1  # 100 > 400 - 320
    assert pick_prefill("least_loaded", loads, 0, {1: 320}) == 0  # the others ignore hits
