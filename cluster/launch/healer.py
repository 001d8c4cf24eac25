"""Self-healing pools: the controller notices dead workers and puts fresh ones in their place.

A worker is found dead two ways: the router's pools take an instance out of rotation when a call
to it fails with ``WorkerDied`` (any rank of a prefill instance takes the whole instance out),
and the health check here asks every live worker a cheap question every
``router.health_check_s`` (a worker that answers slowly is busy, not dead: only Ray's actor
errors count). Each dead instance is then restarted under its index, placed as at start
(``Deployment.restart_decode`` / ``restart_prefill``), after ``router.restart_backoff_s``
doubling with each restart of that index, at most ``router.max_restarts`` times per index; a
start that fails or outlasts ``START_TIMEOUT_S`` counts as a try. The router's links to a fresh
worker are made lazily by the first requests, as at start.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from ray.exceptions import RayActorError

from pdserve.cluster.launch.deployment import Deployment
from pdserve.engine.deploy_config import RouterSettings
from pdserve.router.errors import Role

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0  # a health question unanswered this long: busy, asked again next round
START_TIMEOUT_S = 300.0  # a replacement that is not serving by then is killed and tried again
MAX_BACKOFF_S = 60.0
ROLES: tuple[Role, ...] = ("prefill", "decode")


class Healer:
    """Owned by the controller; ``run`` is its loop (cancel it to stop)."""

    def __init__(self, deployment: Deployment, settings: RouterSettings) -> None:
        self.deployment = deployment
        self.settings = settings
        self.deaths: Counter[str] = Counter()  # by pool
        self.restarts: Counter[str] = Counter()  # replacements now serving, by pool
        self.restarted: Counter[tuple[str, int]] = Counter()  # the same, by instance
        self.attempts: Counter[tuple[str, int]] = Counter()  # restarts tried, by instance
        self.gave_up: set[tuple[str, int]] = set()  # out of restarts: dead for good
        self._healing: dict[tuple[str, int], asyncio.Task[None]] = {}

    def state(self, role: Role, index: int) -> str:
        """``up``; or, out of rotation, ``restarting``, ``failed`` (out of restarts) or
        ``dead`` (not seen by a health check yet)."""
        if index not in self.deployment.router.dead_instances[role]:
            return "up"
        if (role, index) in self._healing:
            return "restarting"
        return "failed" if (role, index) in self.gave_up else "dead"

    def summary(self) -> dict[str, Any]:
        """Deaths and restarts by pool, and the router's migrations and prefill retries."""
        router = self.deployment.router
        return {
            "deaths": {role: self.deaths[role] for role in ROLES},
            "restarts": {role: self.restarts[role] for role in ROLES},
            "migrations": router.migrations,
            "prefill_retries": router.prefill_retries,
        }

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_check_s)
            try:
                await self.check()
            except Exception:  # a blip must not end self-healing
                logger.exception("health check failed")

    async def check(self) -> None:
        """Probe the live workers, then start healing every instance newly found dead."""
        await self._probe()
        dead = self.deployment.router.dead_instances
        for role in ROLES:
            for index in dead[role]:
                key = (role, index)
                if key in self._healing or key in self.gave_up:
                    continue
                self.deaths[role] += 1
                task = asyncio.get_running_loop().create_task(self._heal(role, index))
                self._healing[key] = task

    async def _probe(self) -> None:
        dep = self.deployment
        dead = dep.router.dead_instances
        asks: list[tuple[Role, int, Any]] = [
            ("decode", j, h.get_load.remote())
            for j, h in enumerate(dep.decode)
            if j not in dead["decode"]
        ]
        asks += [
            ("prefill", p.index, rank.queued_tokens.remote())
            for p in dep.prefill
            if p.index not in dead["prefill"]
            for rank in p.ranks
        ]
        replies = await asyncio.gather(
            *(asyncio.wait_for(ref, PROBE_TIMEOUT_S) for _, _, ref in asks), return_exceptions=True
        )
        for (role, index, _), reply in zip(asks, replies):
            if isinstance(reply, RayActorError) and index not in dep.router.dead_instances[role]:
                logger.error("health check: %s instance %d is gone: %s", role, index, reply)
                dep.router.worker_died(role, index)

    async def _heal(self, role: Role, index: int) -> None:
        key = (role, index)
        try:
            while True:
                tried = self.attempts[key]
                if tried >= self.settings.max_restarts:
                    logger.error(
                        "%s instance %d stays dead: %d restarts tried (router.max_restarts)",
                        role,
                        index,
                        tried,
                    )
                    self.gave_up.add(key)
                    return
                self.attempts[key] += 1
                delay = min(self.settings.restart_backoff_s * 2**tried, MAX_BACKOFF_S)
                await asyncio.sleep(delay)
                if await self._restart(role, index):
                    self.restarts[role] += 1
                    self.restarted[key] += 1
                    logger.info("%s instance %d restarted (try %d)", role, index, tried + 1)
                    return
        finally:
            self._healing.pop(key, None)

    async def _restart(self, role: Role, index: int) -> bool:
        dep = self.deployment
        start = dep.restart_decode(index) if role == "decode" else dep.restart_prefill(index)
        try:
            await asyncio.wait_for(start, START_TIMEOUT_S)
        except Exception as e:  # TimeoutError included: the start was cancelled and cleaned up
            logger.error("restarting %s instance %d failed: %r", role, index, e)
            return False
        return True
