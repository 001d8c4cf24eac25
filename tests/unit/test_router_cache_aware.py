"""The cache_aware policies through the router over fake workers (their real block managers
cache prefixes): a repeated prefix goes back to the replica that holds it, and its KV is not
sent again; the router's estimate follows what the replica evicted."""

from __future__ import annotations

import asyncio

import pytest
from _fake_cluster import BLOCK, assert_all_free, consume, fake_cluster, run, until

from pdserve.engine.deploy_config import RouterSettings
from pdserve.engine.prefix_hash import block_hashes
from pdserve.router.prefill_pool import PrefillInstance, PrefillPool
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.router import RequestTrace

SHARED = list(range(300, 312))  # three full blocks


@pytest.mark.parametrize(("policy", "replica", "reused"), [
    ("cache_aware", 1, 12),  # back where the prefix is: its 3 blocks are not sent again
    ("most_free_blocks", 0, 0),  # both replicas equally free: the lowest id, a cold cache
])  # fmt: skip
def test_a_repeated_prefix_goes_back_to_the_replica_holding_it(
    policy: str, replica: int, reused: int
) -> None:
    async def scenario() -> None:
        c = await fake_cluster(
            decode=2, prefix_caching=True, router=RouterSettings(decode_policy=policy)
        )
        d0, d1 = c.decodes
        d0.stepping.clear()  # an unrelated request holds replica 0 meanwhile
        other = asyncio.ensure_future(consume(c.router, "z", 8, 3, prompt=range(500, 508)))
        await until(lambda: bool(d0.held()), "z placed on replica 0")
        first = RequestTrace()
        await consume(c.router, "a", 0, 3, trace=first, prompt=SHARED)
        assert first.decode_instance == 1  # the freer replica
        d0.stepping.set()
        await other
        trace = RequestTrace()
        await consume(c.router, "b", 0, 3, trace=trace, prompt=[*SHARED, 7, 8])
        assert trace.decode_instance == replica
        assert trace.kv_reused_bytes == reused  # the fakes count a byte a token
        assert trace.decode_cached_tokens == reused
        assert trace.prefill_cached_tokens == 0  # the prefill pool computes it all
        assert_all_free(d0)
        assert_all_free(d1)

    run(scenario)


def test_colocated_the_cached_tokens_are_not_prefilled() -> None:
    async def scenario() -> None:
        aware = RouterSettings(decode_policy="cache_aware")
        c = await fake_cluster(prefill=0, prefix_caching=True, router=aware)
        await consume(c.router, "a", 0, 2, prompt=SHARED)
        trace = RequestTrace()
        await consume(c.router, "b", 0, 2, trace=trace, prompt=[*SHARED, 1])
        assert trace.decode_cached_tokens == trace.prefill_cached_tokens == 12
        assert_all_free(c.decodes[0])

    run(scenario)


def test_the_estimate_follows_the_replicas_evictions() -> None:
    """8 blocks: a 7-block prompt evicts two of the shared prompt's three cached blocks (its
    tail first); the router's index forgets the same ones, and the next reservation agrees."""

    async def scenario() -> None:
        aware = RouterSettings(decode_policy="cache_aware")
        c = await fake_cluster(num_blocks=8, prefix_caching=True, router=aware)
        d = c.decodes[0]

        def estimate() -> int:
            return c.router.estimated_cached_blocks["decode"][0]

        await consume(c.router, "a", 0, 1, prompt=SHARED)
        assert estimate() == d.blocks.num_cached_blocks == 3
        await consume(c.router, "big", 0, 1, prompt=range(600, 628))
        assert d.blocks.cached_prefix(block_hashes(SHARED, BLOCK, 0)) == 1
        assert estimate() == d.blocks.num_cached_blocks == 8
        trace = RequestTrace()
        await consume(c.router, "b", 0, 1, trace=trace, prompt=SHARED)
        assert trace.decode_cached_tokens == BLOCK  # as the index expected: one block
        assert_all_free(d)

    run(scenario)


def test_cache_aware_prefill_weighs_cached_tokens_once_instances_cache() -> None:
    """Prefill instances keep no prefix cache yet (cache_blocks 0): the policy is least_loaded.
    Once they do, a prompt goes where its blocks are cached unless the queue there is longer
    than what the cache saves."""
    hashes = block_hashes(list(range(48)), 16, 0)  # 3 blocks of 16

    def pool(cache_blocks: int) -> tuple[PrefillPool, list[PrefillInstance]]:
        instances = [PrefillInstance(i, [], [0], cache_blocks=cache_blocks) for i in range(2)]
        return PrefillPool(instances, "cache_aware", lambda i: None, PrefixIndex(), 16), instances

    caching, (p0, _) = pool(64)
    assert caching.pick(hashes) is p0  # both empty: the lowest id; its cache now holds them
    p0.queued_tokens = 40
    assert caching.pick(hashes) is p0  # 40 queued - 48 cached beats 0 queued
    p0.queued_tokens = 50
    assert caching.pick(hashes).index == 1  # 50 - 48 > 0
    plain, (q0, _) = pool(0)
    assert plain.pick(hashes) is q0
    q0.queued_tokens = 40
    assert plain.pick(hashes).index == 1
