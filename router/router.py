"""The router: reserves decode space, dispatches prefills, wires KV links, fans tokens out.

Life of a request (each attempt, ``attempt.py``, gets a fresh transfer id: the only pairing key)::

    generate ─▶ pick decode + reserve blocks ─▶ ensure links ─▶ open decode stream
             ─▶ pick prefill + dispatch ─▶ first token (TTFT) ─▶ decode deltas … ─▶ finish
    abort at any point: queued prefill removed, or decode told to free once the KV has landed
    KV link failed before the first token: link forgotten, replica probed, request retried
    prefill instance died: retried on another; decode replica died: migrated (token replay)

The router speaks to workers through ``ports`` only (no Ray, no torch here); a dead worker is a
``WorkerDied`` from its port. Here: the pools' wiring, self-healing and the retry loop; one
attempt's placement, links, prefill, stream and exit are ``attempt.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence

from pdserve.engine.deploy_config import DeploymentConfig
from pdserve.engine.load import DecodeLoad
from pdserve.engine.request import StepDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.attempt import Attempts
from pdserve.router.decode_pool import DecodePool
from pdserve.router.errors import NoCapacityError, Role, WorkerDied
from pdserve.router.links import KVLinks
from pdserve.router.phase import Phase
from pdserve.router.ports import DecodePort
from pdserve.router.prefill_pool import PrefillInstance, PrefillPool
from pdserve.router.prefix_index import CacheView
from pdserve.router.retry import KV_LINK_ATTEMPTS, Retry, RetryBudget
from pdserve.router.trace import RequestTrace

__all__ = [
    "KV_LINK_ATTEMPTS",
    "NoCapacityError",
    "Phase",
    "PrefillInstance",
    "RequestTrace",
    "Router",
    "WorkerDied",
]

logger = logging.getLogger(__name__)


class Router:
    """Drives requests through one deployment's pools. All methods run on one event loop."""

    def __init__(
        self,
        prefill: Sequence[PrefillInstance],
        decode: Sequence[DecodePort],
        config: DeploymentConfig,
    ) -> None:
        self.prefill = list(prefill)
        self.decode = list(decode)
        self.config = config
        self._links = KVLinks(self.decode, config.link_prefix)  # names unique per deployment
        self._cache = CacheView(config)  # cache_aware policies: what each instance holds
        self._prefill_pool = PrefillPool(
            self.prefill,
            config.router.prefill_policy,
            self._links.drop_prefill,
            self._cache.prefill,
            config.decode.block_size,
        )
        self._decode_pool = DecodePool(
            self.decode,
            config.router.decode_policy,
            config.decode.block_size,
            self._links.drop_decode,
            self._cache.decode,
        )
        self._phases: dict[str, Phase] = {}  # request id -> RESERVED | PREFILL | DECODE
        self._attempts = Attempts(
            self.prefill,
            self.decode,
            config,
            self._links,
            self._cache,
            (self._prefill_pool, self._decode_pool),
            self._phases,
        )
        self.migrations = 0  # requests moved to another decode replica (token replay)
        self.prefill_retries = 0  # prefills retried on another instance

    def phase(self, request_id: str) -> Phase | None:
        """Where a request is (RESERVED, PREFILL or DECODE); None when unknown or finished."""
        return self._phases.get(request_id)

    @property
    def dead_instances(self) -> dict[str, list[int]]:
        """Instances taken out of rotation after their workers died (for status)."""
        return {
            "prefill": sorted(self._prefill_pool.dead),
            "decode": sorted(self._decode_pool.dead),
        }

    @property
    def estimated_cached_blocks(self) -> dict[str, dict[int, int]]:
        """Blocks the router believes each instance caches (pools with a cache_aware policy)."""
        return self._cache.estimates(len(self.prefill), len(self.decode))

    async def start(self) -> None:
        await self._decode_pool.start()

    # -- self-healing: the controller puts fresh workers in place of dead ones --------------

    def worker_died(self, role: Role, index: int) -> None:
        """A health check found a worker of instance ``index`` gone: out of rotation."""
        if role == "decode":
            self._decode_pool.mark_dead(index)
        else:
            self._prefill_pool.mark_dead(next(p for p in self.prefill if p.index == index))

    def replace_decode(self, d: int, port: DecodePort, load: DecodeLoad) -> None:
        """A fresh replica (its first load) serves as replica ``d``; links to it come lazily."""
        self.decode[d] = port
        self._links.replace_decode(d, port)
        self._decode_pool.replace(d, port, load)

    def replace_prefill(self, fresh: PrefillInstance) -> None:
        """A fresh TP group serves as instance ``fresh.index``; its links come lazily."""
        pos = next(i for i, p in enumerate(self.prefill) if p.index == fresh.index)
        self.prefill[pos] = fresh
        self._links.drop_prefill(fresh.index)
        self._prefill_pool.replace(fresh)

    # -- the request path -------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt: Sequence[int],
        sampling: SamplingParams,
        trace: RequestTrace | None = None,
    ) -> AsyncGenerator[StepDelta, None]:
        """Yields the first token, then decode's deltas until one carries a finish or error.

        Disaggregated: the first token comes from the prefill instance (TTFT does not wait for
        the KV transfer tail). Colocated (no prefill pool): the instance prefills locally and its
        stream carries the first token too. A worker's death is retried (``router.retry``): a
        KV link failed before anything was yielded, a prefill instance died (another takes the
        prompt), or the decode replica died (token replay: the prompt plus every token yielded
        so far is prefilled again for a live replica, and the stream goes on from the next
        token, the same tokens a run without the fault gives).
        """
        trace = trace or RequestTrace()
        budget = RetryBudget(self.config.router)
        streamed: list[int] = []  # yielded so far, over every attempt
        while True:
            replay = (*prompt, *streamed)
            try:
                async with contextlib.aclosing(
                    self._attempts.run(request_id, replay, len(streamed), sampling, trace)
                ) as deltas:
                    async for delta in deltas:
                        streamed += delta.token_ids
                        yield delta
                return
            except Retry as retry:
                budget.spend(retry, request_id)  # raises past the limit
                if retry.kind == "decode":
                    trace.migrations += 1
                    self.migrations += 1
                elif retry.kind == "prefill":
                    trace.prefill_retries += 1
                    self.prefill_retries += 1
                logger.warning(
                    "request %s: %s; retrying it (%s, %d tokens streamed)",
                    request_id, retry.error, retry.kind, len(streamed),
                )  # fmt: skip
