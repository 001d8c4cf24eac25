"""The router's estimate of each instance's prefix cache: what it matches, what it forgets, and
that its hashes are the decode replicas' own."""

from __future__ import annotations

from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.step import EngineLimits
from pdserve.engine.deploy_config import (
    DecodeSettings,
    DeploymentConfig,
    KVCacheSize,
    ModelSettings,
    RouterSettings,
)
from pdserve.engine.prefix_hash import hash_salt
from pdserve.engine.request import DecodeRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.prefix_index import CacheView, PrefixIndex

AWARE = RouterSettings(prefill_policy="cache_aware", decode_policy="cache_aware")


def config(dtype: str = "auto", caching: bool = True, router: RouterSettings = AWARE):
    decode = DecodeSettings(block_size=4, kv_cache=KVCacheSize(blocks=64, dtype=dtype))
    return DeploymentConfig(
        "t", ModelSettings("/models/m"), decode=decode, prefix_caching=caching, router=router
    )


def test_a_match_is_the_leading_blocks_only() -> None:
    index = PrefixIndex()
    index.insert(0, [11, 12, 13])
    assert index.match(0, [11, 12, 13, 14]) == 3
    assert index.match(0, [11, 99, 13]) == 1  # a prefix cache stops at its first miss
    assert index.match(1, [11]) == 0  # another instance holds nothing


def test_capacity_forgets_the_least_recently_used_tail_first() -> None:
    index = PrefixIndex()
    index.resize(0, 4)
    index.insert(0, [1, 2, 3])
    index.insert(0, [7, 8])  # one over: the older sequence's tail goes, its head stays
    assert index.match(0, [1, 2, 3]) == 2
    assert index.size(0) == 4
    index.insert(0, [1])  # touched: now the newest
    index.resize(0, 2)
    assert index.match(0, [1]) == 1 and index.match(0, [7, 8]) == 1


def test_a_reservation_that_found_less_corrects_the_belief() -> None:
    index = PrefixIndex()
    index.insert(0, [50, 51])  # older: evicted before the next one, if that one was
    index.insert(0, [1, 2, 3])
    index.insert(0, [60])  # newer
    index.correct(0, [1, 2, 3, 4], cached=1)  # the replica had only block 1
    assert index.match(0, [1, 2, 3]) == 1
    assert index.match(0, [50, 51]) == 0  # less recently used than the missed block: gone too
    assert index.match(0, [60]) == 1
    index.correct(0, [60], cached=1)  # what it believed: nothing changes
    assert index.match(0, [60]) == 1


def test_a_dead_instance_holds_nothing() -> None:
    index = PrefixIndex()
    index.insert(2, [1, 2])
    index.forget(2)
    assert index.match(2, [1, 2]) == 0


def test_the_routers_hashes_are_the_decode_replicas() -> None:
    """The salt is built as the decode worker builds it (model path, KV dtype, block size):
    blocks a replica registered are found under the router's hashes, and only the same
    deployment's settings find them."""
    cfg = config()
    d = cfg.decode
    limits = EngineLimits(
        num_blocks=64, block_size=4, max_model_len=256, num_kv_heads=1, prefix_caching=True,
        prefix_salt=hash_salt(cfg.model.path, d.kv_cache.dtype, d.block_size),
    )  # fmt: skip
    engine = DecodeEngine(None, limits)
    prompt = tuple(range(100, 110))
    engine.reserve(DecodeRequest(1, "r", prompt, SamplingParams(max_tokens=4)))
    engine.kv_landed(1, 1, 0, 0.0, 7)
    assert engine.blocks.cached_prefix(CacheView(cfg).hashes(prompt)) == 2
    assert engine.blocks.cached_prefix(CacheView(config(dtype="int8")).hashes(prompt)) == 0


def test_indexes_are_kept_only_for_cache_aware_pools_with_caching_on() -> None:
    view = CacheView(config())
    assert view.decode is not None and view.prefill is not None
    assert not CacheView(config(caching=False)).enabled
    assert CacheView(config(caching=False)).hashes(range(8)) == []
    half = CacheView(config(router=RouterSettings(decode_policy="cache_aware")))
    assert half.decode is not None and half.prefill is None


def test_an_answer_adds_its_filled_blocks_but_not_the_last_token() -> None:
    view = CacheView(config())
    prompt, output = list(range(6)), [40, 41, 42]  # 9 tokens; the last has no KV: 8 cached
    view.answered(0, prompt, output)
    assert view.decode is not None
    assert view.decode.match(0, view.hashes([*prompt, *output])) == 2
    view.answered(1, prompt, [40, 41])  # 7 tokens with KV: one full block
    assert view.decode.match(1, view.hashes([*prompt, 40, 41, 42])) == 1
    assert view.estimates(0, 2) == {"prefill": {}, "decode": {0: 2, 1: 1}}
