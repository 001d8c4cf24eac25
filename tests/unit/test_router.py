"""The router over in-process fake workers: the request path, dead workers, capacity, colocated.

Every scenario ends by checking each surviving decode replica's real block accounting: all
blocks free and `check_integrity()` clean, so a leaked reservation or a skipped abort fails it.
"""

from __future__ import annotations

import asyncio

import pytest
from _fake_cluster import BLOCK, assert_all_free, consume, fake_cluster, run, until
from _fake_decode import FIRST_TOKEN

from pdserve.kv_transfer.errors import KVLinkError
from pdserve.router import decode_pool
from pdserve.router.errors import NoCapacityError
from pdserve.router.phase import Phase
from pdserve.router.router import KV_LINK_ATTEMPTS, RequestTrace


def test_disaggregated_request_end_to_end() -> None:
    async def scenario() -> None:
        c = await fake_cluster()
        trace = RequestTrace()
        tokens = await consume(c.router, "a", 10, 5, trace=trace)
        assert tokens[0] == FIRST_TOKEN and len(tokens) == 5  # first from prefill, rest decode
        assert (trace.prefill_instance, trace.decode_instance) == (0, 0)
        assert trace.kv_bytes == 10  # the fake's KV-landed delta reached the trace
        assert c.router.phase("a") is None
        assert_all_free(c.decodes[0])
        await consume(c.router, "b", 7, 3)
        assert len(c.decodes[0].links) == 1  # the second request reused the link
        assert not [call for call in c.decodes[0].calls if call[0] == "abort"]  # finished, no abort
        assert_all_free(c.decodes[0])

    run(scenario)


def test_the_reservations_cached_blocks_reach_the_prefill_and_the_trace() -> None:
    """A prompt whose leading blocks the replica holds: the prefill item says how many, so
    only the rest is sent; the trace counts the sent and the reused KV apart."""

    async def scenario() -> None:
        c = await fake_cluster(prefix_caching=True)
        await consume(c.router, "a", 10, 3)  # its 2 full blocks are cached once it landed
        trace = RequestTrace()
        await consume(c.router, "b", 11, 3, trace=trace)  # the same first 10 tokens
        assert [it.decode_cached_blocks for it in c.prefills[0].items] == [0, 2]
        second = c.prefills[0].items[1]
        assert second.block_ids[:2] == c.prefills[0].items[0].block_ids[:2]  # shared
        assert (trace.kv_bytes, trace.kv_reused_bytes) == (11 - 2 * BLOCK, 2 * BLOCK)
        assert_all_free(c.decodes[0])

    run(scenario)


def test_colocated_request_prefills_on_decode() -> None:
    async def scenario() -> None:
        c = await fake_cluster(prefill=0)
        tokens = await consume(c.router, "a", 10, 6)
        assert tokens[0] == FIRST_TOKEN and len(tokens) == 6  # the first came from decode
        assert_all_free(c.decodes[0])

    run(scenario)


def test_replica_dying_between_reservation_and_kv_is_retried_elsewhere() -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=2)
        d0, d1 = c.decodes
        c.prefills[0].sending.clear()
        trace = RequestTrace()
        task = asyncio.ensure_future(consume(c.router, "a", 10, 4, trace=trace))
        await until(lambda: bool(c.prefills[0].transferring), "KV on its way to replica 0")
        assert d0.held() and not d1.held()
        d0.die()
        c.prefills[0].sending.set()
        tokens = await task
        assert len(tokens) == 4 and trace.decode_instance == 1
        assert c.router.dead_instances == {"prefill": [], "decode": [0]}
        assert_all_free(d1)
        await consume(c.router, "b", 10, 2)  # later requests go to the survivor
        assert_all_free(d1)

    run(scenario)


def test_replica_dying_while_its_link_is_made_is_retried_elsewhere() -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=2)
        d0, d1 = c.decodes
        d0.listening.clear()
        task = asyncio.ensure_future(consume(c.router, "a", 10, 3))
        await until(lambda: "listen" in {call[0] for call in d0.calls}, "link asked of d0")
        d0.die()
        assert len(await task) == 3
        assert c.router.dead_instances == {"prefill": [], "decode": [0]}  # not blamed on prefill
        assert_all_free(d1)

    run(scenario)


def test_kv_link_failing_on_every_attempt_gives_up_after_the_last() -> None:
    async def scenario() -> None:
        c = await fake_cluster()
        c.prefills[0].break_links = True
        with pytest.raises(KVLinkError, match="replica 0"):
            await consume(c.router, "a", 10, 3)
        reserves = [call for call in c.decodes[0].calls if call[0] == "reserve"]
        assert len(reserves) == KV_LINK_ATTEMPTS
        assert len(c.decodes[0].links) == KV_LINK_ATTEMPTS  # each retry built a fresh link
        assert_all_free(c.decodes[0])

    run(scenario)


def test_dead_prefill_instances_are_retried_elsewhere_until_none_is_left() -> None:
    async def scenario() -> None:
        c = await fake_cluster(prefill=2)
        p0, p1 = c.prefills
        decode = c.decodes[0]
        p0.die()  # before its link exists: found dead while the link is made
        trace = RequestTrace()
        assert len(await consume(c.router, "a", 10, 3, trace=trace)) == 3  # retried on p1
        assert (trace.prefill_retries, trace.prefill_instance) == (1, 1)
        assert c.router.dead_instances["prefill"] == [0]
        assert ("kill",) in p0.calls  # a dead instance's ranks are ended
        assert_all_free(decode)
        p1.die()  # its link exists: found dead by the prefill call, then none is left
        with pytest.raises(NoCapacityError, match="no prefill instance is alive"):
            await consume(c.router, "c", 10, 3)
        assert c.router.dead_instances["prefill"] == [0, 1]
        assert_all_free(decode)
        reserves = len(decode.calls)
        with pytest.raises(NoCapacityError, match="no prefill instance is alive"):
            await consume(c.router, "d", 10, 3)
        assert len(decode.calls) == reserves  # refused before reserving anything

    run(scenario)


def test_dead_decode_replica_is_routed_around_then_no_capacity() -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=2)
        c.decodes[0].die()
        assert len(await consume(c.router, "a", 10, 3)) == 3
        assert c.router.dead_instances["decode"] == [0]
        assert_all_free(c.decodes[1])
        c.decodes[1].die()
        with pytest.raises(NoCapacityError, match="no decode replica is alive"):
            await consume(c.router, "b", 10, 3)

    run(scenario)


def test_prompt_larger_than_every_replica_is_refused_at_once() -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=2, num_blocks=4)
        with pytest.raises(NoCapacityError, match="needs 5 KV blocks"):
            await consume(c.router, "a", 4 * BLOCK + 1, 3)
        assert not c.decodes[0].calls and not c.decodes[1].calls

    run(scenario)


def test_full_replica_makes_a_request_wait_until_another_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # no periodic re-check in this test: only the finishing request can wake the waiting one
    monkeypatch.setattr(decode_pool, "CAPACITY_WAIT_S", 3600.0)

    async def scenario() -> None:
        c = await fake_cluster(num_blocks=4)
        decode = c.decodes[0]
        decode.stepping.clear()  # the first request holds its blocks until we let it decode
        first = asyncio.ensure_future(consume(c.router, "a", 3 * BLOCK, 3))
        await until(lambda: c.router.phase("a") is Phase.DECODE, "first request decoding")
        second = asyncio.ensure_future(consume(c.router, "b", 2 * BLOCK, 3))
        for _ in range(20):
            await asyncio.sleep(0)
        assert c.router.phase("b") is None and len(decode.held()) == 1  # waiting, not reserved
        decode.stepping.set()
        assert len(await first) == 3 and len(await second) == 3
        assert_all_free(decode)

    run(scenario)


def test_last_prefill_dying_while_a_request_waits_for_blocks_frees_its_reservation() -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=2, num_blocks=4)
        for d in c.decodes:
            d.stepping.clear()  # the first two requests hold 3 of each replica's 4 blocks
        holders = [asyncio.ensure_future(consume(c.router, r, 3 * BLOCK, 3)) for r in "ab"]
        await until(lambda: all(c.router.phase(r) is Phase.DECODE for r in "ab"), "decoding")
        waiting = asyncio.ensure_future(consume(c.router, "w", 2 * BLOCK, 3))  # needs 2 blocks
        c.prefills[0].die()
        # fits in one block: finds the prefill dead, and no other to retry on
        with pytest.raises(NoCapacityError, match="no prefill instance is alive"):
            await consume(c.router, "x", BLOCK, 3)
        for d in c.decodes:
            d.stepping.set()
        await asyncio.gather(*holders)
        with pytest.raises(NoCapacityError, match="no prefill instance is alive"):
            await waiting  # it got blocks, then found no prefill instance: it gives them back
        for d in c.decodes:
            assert_all_free(d)

    run(scenario)
