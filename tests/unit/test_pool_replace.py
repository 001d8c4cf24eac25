"""Self-healing on the router over fake workers: a dead decode replica or prefill instance is put
back in rotation by a fresh worker under the same index (``Router.replace_decode`` /
``replace_prefill``), with fresh load and cache state, links made anew on the fresh port, and a
late error from the replaced worker never touching its successor."""

from __future__ import annotations

from _fake_cluster import BLOCK, assert_all_free, consume, fake_cluster, run
from _fake_decode import FakeDecode
from _fake_prefill import FakePrefill

from pdserve.engine.deploy_config import RouterSettings
from pdserve.router.prefill_pool import PrefillInstance
from pdserve.router.router import RequestTrace

CACHE_AWARE = RouterSettings(prefill_policy="cache_aware", decode_policy="cache_aware")


def test_a_dead_replica_is_replaced_and_serves_under_its_index() -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=2)
        await consume(c.router, "warm", 8, 3)  # links to both replicas may now exist
        c.decodes[0].die()
        c.router.worker_died("decode", 0)  # what the controller's health check does
        assert c.router.dead_instances["decode"] == [0]
        fresh = FakeDecode(0, 16, BLOCK, False)
        c.prefills[0].decodes[0] = fresh  # the fake prefill lands KV on decode objects
        c.router.replace_decode(0, fresh, await fresh.load())
        assert c.router.dead_instances["decode"] == []
        c.decodes[1].die()  # only the fresh replica can serve now
        trace = RequestTrace()
        assert len(await consume(c.router, "after", 8, 4, trace=trace)) == 4
        assert trace.decode_instance == 0
        listens = [x for x in fresh.calls if x[0] == "listen"]
        assert len(listens) == 1  # a new link, made lazily on the fresh port
        assert_all_free(fresh)

    run(scenario)


def test_a_replaced_replica_starts_with_nothing_believed_cached() -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=1, prefix_caching=True, router=CACHE_AWARE)
        await consume(c.router, "a", 4 * BLOCK, 2)
        assert c.router.estimated_cached_blocks["decode"][0] > 0
        c.decodes[0].die()
        c.router.worker_died("decode", 0)
        fresh = FakeDecode(0, 16, BLOCK, True)
        c.prefills[0].decodes[0] = fresh
        c.router.replace_decode(0, fresh, await fresh.load())
        assert c.router.estimated_cached_blocks["decode"][0] == 0
        await consume(c.router, "b", 4 * BLOCK, 2)
        assert_all_free(fresh)

    run(scenario)


def test_a_dead_prefill_instance_is_replaced_and_a_late_error_spares_it() -> None:
    async def scenario() -> None:
        c = await fake_cluster(prefill=1, decode=1)
        await consume(c.router, "warm", 8, 3)
        old = c.router.prefill[0]
        c.prefills[0].die()
        c.router.worker_died("prefill", 0)
        assert c.router.dead_instances["prefill"] == [0]
        rank = FakePrefill(0, c.decodes)
        c.router.replace_prefill(PrefillInstance(0, [rank], [0]))
        assert c.router.dead_instances["prefill"] == []
        assert c.router.prefill[0].queued_requests == 0
        trace = RequestTrace()
        assert len(await consume(c.router, "after", 8, 4, trace=trace)) == 4
        assert trace.prefill_instance == 0 and len(rank.items) == 1
        assert [x[0] for x in rank.calls].count("connect_link") == 1  # its link made anew
        c.router._prefill_pool.mark_dead(old)  # a late failure of the replaced instance
        assert c.router.dead_instances["prefill"] == []
        assert ("kill",) not in rank.calls
        assert_all_free(c.decodes[0])

    run(scenario)
