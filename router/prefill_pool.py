"""The prefill pool as the router sees it: TP groups, their queue counters, the dead ones, and
(policy `cache_aware`) what each one's prefix cache likely holds."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.engine.load import PrefillLoad
from pdserve.router.errors import NoCapacityError
from pdserve.router.policies import pick_prefill
from pdserve.router.ports import PrefillPort
from pdserve.router.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)

DEAD_POOL = "no prefill instance is alive: redeploy (pdserve down/up)"


@dataclass
class PrefillInstance:
    """A TP group: ``ranks[0]`` is the leader; ``senders`` are the ranks that send KV."""

    index: int
    ranks: list[PrefillPort]
    senders: list[int]
    queued_tokens: int = 0
    queued_requests: int = 0
    # KV blocks its prefix cache can hold (the deployment reads it off the leader); 0: it keeps
    # none (prefix caching off). `cache_aware` counts the prompt's blocks expected cached there.
    cache_blocks: int = 0

    @property
    def leader(self) -> PrefillPort:
        return self.ranks[0]


class PrefillPool:
    """Picks an instance by policy over its queue counters; a dead one leaves the rotation."""

    def __init__(
        self,
        instances: Sequence[PrefillInstance],
        policy: str,
        on_dead: Callable[[int], None],
        index: PrefixIndex | None = None,
        block_size: int = 16,
    ) -> None:
        self.instances = list(instances)
        self.policy = policy
        self.index = index  # policy cache_aware: what each instance's prefix cache likely holds
        self.block_size = block_size
        self.dead: set[int] = set()  # instances with a dead rank
        self._on_dead = on_dead
        self._turn = itertools.count()  # its own round-robin position (not the decode pool's)
        self._reaping: set[asyncio.Task[None]] = set()  # killing a dead instance's ranks

    def check_alive(self) -> None:
        """Raise NoCapacityError when no instance is alive."""
        if len(self.dead) == len(self.instances):
            raise NoCapacityError(DEAD_POOL)

    def pick(self, hashes: Sequence[int] = ()) -> PrefillInstance:
        """The instance for a prompt whose full blocks hash to `hashes`."""
        alive = {p.index: p for p in self.instances if p.index not in self.dead}
        if not alive:
            raise NoCapacityError(DEAD_POOL)
        loads = [PrefillLoad(i, p.queued_tokens, p.queued_requests) for i, p in alive.items()]
        caching = [p for p in alive.values() if p.cache_blocks > 0]
        cached = None
        if self.index is not None and caching:
            cached = {p.index: self.index.match(p.index, hashes) * self.block_size for p in caching}
        chosen = alive[pick_prefill(self.policy, loads, next(self._turn), cached)]
        if self.index is not None and chosen.cache_blocks > 0:
            self.index.resize(chosen.index, chosen.cache_blocks)
            self.index.insert(chosen.index, hashes)  # cached there once it has prefilled it
        return chosen

    def mark_dead(self, p: PrefillInstance) -> None:
        """A dead rank takes its instance out of rotation (its TP group cannot run a batch);
        its links go with it, the rest of the pool serves on."""
        if all(q is not p for q in self.instances):  # a replaced instance's late error
            return  # its successor lives
        if p.index not in self.dead:
            logger.error("prefill instance %d has a dead rank; routing around it", p.index)
            self.dead.add(p.index)
            if self.index is not None:
                self.index.forget(p.index)
            self._on_dead(p.index)
            task = asyncio.get_running_loop().create_task(self._kill(p))
            self._reaping.add(task)  # keep a reference until it is done
            task.add_done_callback(self._reaping.discard)

    def replace(self, fresh: PrefillInstance) -> None:
        """Put a fresh instance in place of the dead one of the same index (self-healing): back
        in rotation with empty queue counters and nothing believed cached; its links are made
        lazily by the first requests."""
        pos = next(i for i, p in enumerate(self.instances) if p.index == fresh.index)
        self.instances[pos] = fresh
        self.dead.discard(fresh.index)
        if self.index is not None:
            self.index.forget(fresh.index)
        logger.info("prefill instance %d replaced; back in rotation", fresh.index)

    async def _kill(self, p: PrefillInstance) -> None:
        """End every rank of a dead instance: a live rank of a broken TP group can run no step,
        and its links to decode replicas close with it."""
        for rank, port in enumerate(p.ranks):
            try:
                await port.kill()
            except Exception as e:  # best effort: the instance is out of rotation anyway
                logger.warning("prefill instance %d rank %d: kill failed: %s", p.index, rank, e)
