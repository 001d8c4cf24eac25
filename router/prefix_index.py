"""What the router believes each instance's prefix cache holds, for the `cache_aware` policies.

Per instance, the chained block hashes (`engine.prefix_hash`, with the deployment's salt) of the
prompts it routed there and of the answers it streamed back, bounded to the instance's KV
capacity and forgotten least recently used first. It is an estimate, as the indexes of SGLang's
cache-aware router and Dynamo's KV router are: the instance evicts by its own LRU and sooner
under memory pressure. Each reservation corrects it: the replica reports how many leading
blocks it found (`Reservation.cached_blocks`); a block the index believed present that the
replica lacked is forgotten, with every block the index used less recently (an LRU cache that
evicted it evicted those first). Pure Python: no Ray, no torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from pdserve.engine.deploy_config import DeploymentConfig
from pdserve.engine.prefix_hash import block_hashes, hash_salt

CACHE_AWARE = "cache_aware"


class PrefixIndex:
    """Per instance, an LRU set of block hashes. A sequence is touched tail first, so its head
    (the prefix others share) is the most recently used, as the block manager evicts an
    owner's tail before its head."""

    def __init__(self) -> None:
        self._lru: dict[int, OrderedDict[int, None]] = {}  # least recently used first
        self._capacity: dict[int, int] = {}  # instance -> blocks; absent: unbounded

    def resize(self, instance: int, blocks: int) -> None:
        """Bound `instance`'s entries to `blocks` (its KV blocks in all)."""
        self._capacity[instance] = max(0, blocks)
        self._trim(instance)

    def match(self, instance: int, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` believed cached on `instance` (a prefix cache stops at its
        first miss)."""
        lru = self._lru.get(instance)
        n = 0
        while lru and n < len(hashes) and hashes[n] in lru:
            n += 1
        return n

    def matches(self, instances: Iterable[int], hashes: Sequence[int]) -> dict[int, int]:
        return {i: self.match(i, hashes) for i in instances}

    def insert(self, instance: int, hashes: Sequence[int]) -> None:
        """`instance` now holds these blocks (touched tail first: the head ends most recent)."""
        lru = self._lru.setdefault(instance, OrderedDict())
        for h in reversed(hashes):
            lru[h] = None
            lru.move_to_end(h)
        self._trim(instance)

    def correct(self, instance: int, lookup: Sequence[int], cached: int) -> None:
        """`instance` reserved a prompt whose `lookup` hashes hit `cached` leading blocks there:
        if the index believed more were cached, forget the first missed block and past it."""
        lru = self._lru.get(instance)
        if lru is not None and cached < len(lookup) and lookup[cached] in lru:
            missed = lookup[cached]
            while lru:  # it, and whatever the index used less recently
                if lru.popitem(last=False)[0] == missed:
                    break
            for h in lookup[cached + 1 :]:  # unreachable past the miss
                lru.pop(h, None)

    def forget(self, instance: int) -> None:
        """The instance is gone (dead): nothing is cached there."""
        self._lru.pop(instance, None)

    def size(self, instance: int) -> int:
        """Blocks believed cached on `instance`."""
        return len(self._lru.get(instance, ()))

    def _trim(self, instance: int) -> None:
        lru, cap = self._lru.get(instance), self._capacity.get(instance)
        while lru and cap is not None and len(lru) > cap:
            lru.popitem(last=False)


class CacheView:
    """The router's prefix-cache estimates: one `PrefixIndex` per pool whose policy is
    `cache_aware` (None otherwise, or with prefix caching off), and prompt hashes computed
    with the decode replicas' own salt (`decode_worker.worker` builds it from the model path,
    `decode.kv_cache.dtype` and `decode.block_size`), so they equal the replicas' hashes."""

    def __init__(self, config: DeploymentConfig) -> None:
        on = config.prefix_caching
        router = config.router
        self.decode = PrefixIndex() if on and router.decode_policy == CACHE_AWARE else None
        prefill_aware = on and config.prefill is not None and router.prefill_policy == CACHE_AWARE
        self.prefill = PrefixIndex() if prefill_aware else None
        d = config.decode
        self.block_size = d.block_size
        self.salt = hash_salt(config.model.path, d.kv_cache.dtype, d.block_size)

    @property
    def enabled(self) -> bool:
        return self.decode is not None or self.prefill is not None

    def hashes(self, tokens: Sequence[int]) -> list[int]:
        """The full blocks' chained hashes ([] when no index is kept)."""
        return block_hashes(tokens, self.block_size, self.salt) if self.enabled else []

    def estimates(self, prefill: int, decode: int) -> dict[str, dict[int, int]]:
        """Blocks believed cached per instance, for the pools with an index (status)."""
        pools = {"prefill": (self.prefill, prefill), "decode": (self.decode, decode)}
        return {
            role: {i: index.size(i) for i in range(n)}
            for role, (index, n) in pools.items()
            if index is not None
        }

    def answered(self, decode: int, prompt: Sequence[int], output: Sequence[int]) -> None:
        """A request finished on `decode`: the replica caches the blocks filled by its prompt and
        every output token but the last (whose KV no step computed)."""
        if self.decode is not None and output:
            self.decode.insert(decode, self.hashes([*prompt, *output[:-1]]))
