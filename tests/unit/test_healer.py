"""The controller's Healer over a fake deployment (a real router on fake workers): a dead
instance is restarted after the backoff, doubling per try; a failing start counts as a try; past
router.max_restarts the instance stays dead (state failed); deaths and restarts are counted."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from _fake_cluster import BLOCK, fake_cluster, run, until
from _fake_decode import FakeDecode

from pdserve.cluster.launch.healer import Healer
from pdserve.engine.deploy_config import RouterSettings
from pdserve.router.router import Router


class FakeDeployment:
    """What the Healer uses of a Deployment: the router, worker handles (none to probe here)
    and restarts, of which the first ``failures`` raise."""

    def __init__(self, router: Router, failures: int) -> None:
        self.router = router
        self.decode: list[Any] = []
        self.prefill: list[Any] = []
        self.failures = failures
        self.tries: list[float] = []  # when each restart began

    async def restart_decode(self, j: int) -> None:
        self.tries.append(time.monotonic())
        if len(self.tries) <= self.failures:
            raise RuntimeError("no room for the replica")
        fresh = FakeDecode(j, 16, BLOCK, False)
        self.router.replace_decode(j, fresh, await fresh.load())


def _healer(router: Router, failures: int, max_restarts: int) -> tuple[Healer, FakeDeployment]:
    dep = FakeDeployment(router, failures)
    settings = RouterSettings(restart_backoff_s=0.05, max_restarts=max_restarts)
    return Healer(dep, settings), dep  # type: ignore[arg-type]


def test_a_dead_replica_is_restarted_after_a_doubling_backoff() -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=2)
        healer, dep = _healer(c.router, failures=1, max_restarts=3)
        c.decodes[0].die()
        c.router.worker_died("decode", 0)
        died = time.monotonic()
        await healer.check()
        await healer.check()  # a death is counted once, healed once
        assert healer.state("decode", 0) == "restarting"
        await until(lambda: healer.state("decode", 0) == "up", "replica 0 restarted")
        assert dep.tries[0] - died >= 0.05 and dep.tries[1] - dep.tries[0] >= 0.1
        assert healer.summary()["deaths"] == {"prefill": 0, "decode": 1}
        assert healer.summary()["restarts"] == {"prefill": 0, "decode": 1}
        assert healer.restarted["decode", 0] == 1 and c.router.dead_instances["decode"] == []

    run(scenario)


def test_past_max_restarts_the_instance_stays_dead() -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=2)
        healer, dep = _healer(c.router, failures=99, max_restarts=2)
        c.decodes[1].die()
        c.router.worker_died("decode", 1)
        await healer.check()
        await until(lambda: healer.state("decode", 1) == "failed", "given up")
        assert len(dep.tries) == 2 and healer.summary()["restarts"]["decode"] == 0
        await healer.check()
        await asyncio.sleep(0.3)
        assert len(dep.tries) == 2 and healer.deaths["decode"] == 1  # no more tries, no recount

    run(scenario)
