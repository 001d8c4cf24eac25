"""Greedy parity with transformers through the real Ray path: prefill actor(s) -> gloo KV link
-> decode actor, for every supported architecture, TP=1 and TP=2 prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from cluster_helpers import NEW_TOKENS, hf_greedy, parity_prompts

from pdserve.cluster import LLM, SamplingParams
from pdserve.engine.kv_cache import bytes_per_block
from pdserve.engine.tiny_model import TINY_ARCHS

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_parity_with_transformers(
    ray_session: None, tiny_dirs: dict[str, Path], arch: str, tp: int
) -> None:
    """One mixed batch, then prompts sharing a prefix through both pools' prefix caches (on by
    default), on one prefill instance and two decode replicas taken in turn: every output is
    transformers' greedy one. The shared-prefix part: the second prompt's 4-block prefix is
    cached on prefill but not on its replica (read from the prefill cache and sent), the third
    (the prefix alone) is cached on both (its last block computed again for its first token,
    nothing sent: decode reuses the blocks it holds)."""
    model = tiny_dirs[arch]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(
        str(model), prefill_tensor_parallel_size=tp, decode_instances=2,
        decode_policy="round_robin", dtype="float32",
    ) as llm:  # fmt: skip
        prompts = parity_prompts(len(llm.tokenizer))
        outs = llm.generate(prompts, params)  # one mixed batch: 1, 7, 100 and 300 tokens
        assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
        # every head of every layer, whole 16-token blocks, summed over the TP ranks' links
        per_block = 16 * llm.model_config.kv_bytes_per_token()
        assert [o.metrics.kv_bytes for o in outs] == [-(-len(p) // 16) * per_block for p in prompts]
        # the wait for the KV sends after the forward is timed on every batch, within prefill
        assert all(0 < o.metrics.kv_wait_s <= o.metrics.prefill_s for o in outs)
        before = ray.get(llm.deployment.prefill[0].leader.stats.remote())
        first, later = _shared_prefix_prompts(len(llm.tokenizer))
        shared = [llm.generate([p], params)[0] for p in (first, *later)]  # decode 0, 1, 0
        after = ray.get(llm.deployment.prefill[0].leader.stats.remote())
        assert llm.check_integrity() == 0
    expected = hf_greedy(model, prompts, NEW_TOKENS)
    for n, out, ref in zip(map(len, prompts), outs, expected):
        assert out.token_ids == ref, f"{arch} TP={tp}, prompt of {n} tokens diverged"
    assert [o.metrics.cached_tokens for o in shared] == [0, 64, 48]
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    assert (queries, hits) == (74 + 77 + 64, 64 + 48)
    assert [o.metrics.kv_bytes for o in shared] == [n * per_block for n in (5, 5, 0)]
    assert [o.metrics.kv_reused_bytes for o in shared] == [n * per_block for n in (0, 0, 4)]
    assert [o.token_ids for o in shared] == hf_greedy(model, [first, *later], NEW_TOKENS)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_parity_colocated(ray_session: None, tiny_dirs: dict[str, Path], arch: str) -> None:
    model = tiny_dirs[arch]
    with LLM(str(model), mode="colocated", decode_instances=1, dtype="float32") as llm:
        prompts = parity_prompts(len(llm.tokenizer))
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params)
        assert llm.check_integrity() == 0
    expected = hf_greedy(model, prompts, NEW_TOKENS)
    assert [o.token_ids for o in outs] == expected
    assert all(o.metrics.kv_bytes == 0 for o in outs)  # nothing crossed a link


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_parity_colocated_chunked_prefill(
    ray_session: None, tiny_dirs: dict[str, Path], arch: str
) -> None:
    """64 tokens a step: the 100- and 300-token prompts run in chunks, each continuing the K/V of
    the last (on mistral through a 128-token sliding window), beside the short ones' decode."""
    model = tiny_dirs[arch]
    with LLM(
        str(model),
        mode="colocated",
        enable_chunked_prefill=True,
        max_num_batched_tokens=64,
        dtype="float32",
    ) as llm:
        prompts = parity_prompts(len(llm.tokenizer))
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params)
        assert llm.check_integrity() == 0
    assert [o.token_ids for o in outs] == hf_greedy(model, prompts, NEW_TOKENS)


def test_greedy_parity_tp4_replicated_kv_heads(
    ray_session: None, tiny_dirs: dict[str, Path]
) -> None:
    """The tiny llama has 2 KV heads: at TP=4 ranks pair up on a head and only the first of
    each pair sends it; decode assembles both heads from two of the four ranks."""
    model = tiny_dirs["llama"]
    with LLM(str(model), prefill_tensor_parallel_size=4, dtype="float32") as llm:
        assert llm.deployment.prefill[0].senders == [0, 2]
        prompts = parity_prompts(len(llm.tokenizer))
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params)
        assert llm.check_integrity() == 0
    assert [o.token_ids for o in outs] == hf_greedy(model, prompts, NEW_TOKENS)


@pytest.mark.parametrize(("kv_dtype", "backend"), [("int8", "auto"), ("fp8_e4m3", "host")])
def test_compressed_kv_cache_disaggregated_equals_colocated(
    ray_session: None, tiny_dirs: dict[str, Path], kv_dtype: str, backend: str
) -> None:
    """A compressed KV cache through the real Ray path: the prefill rank quantizes each layer's
    K/V as the decode cache's own writes do, so a 1P1D deployment generates exactly what a
    colocated one with the same KV dtype does, and its transfers shrink with the cache. The
    fp8 case moves its KV through the shared-memory ring (kv_transfer.backend host)."""
    model = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    knobs = {"kv_cache_dtype": kv_dtype, "kv_transfer_backend": backend}
    with LLM(str(model), dtype="float32", **knobs) as llm:
        prompts = parity_prompts(len(llm.tokenizer))
        outs = llm.generate(prompts, params)
        assert llm.check_integrity() == 0
        config, size = llm.model_config, llm.config.decode.kv_cache
        stats = ray.get(llm.deployment.decode[0].stats.remote())
    assert list(stats.kv_bytes_by_backend) == ["gloo" if backend == "auto" else backend]
    # every head of every layer in whole 16-token blocks: codes and one float16 scale per
    # (token, head) row, (head_dim + 2) / (4 * head_dim) of the float32 bytes
    per_block = bytes_per_block(config, 1, 16, kv_dtype)
    assert per_block * 4 * config.head_dim == 16 * config.kv_bytes_per_token() * (
        config.head_dim + 2
    )
    assert [o.metrics.kv_bytes for o in outs] == [-(-len(p) // 16) * per_block for p in prompts]
    # the decode replica's memory holds 4 * head_dim / (head_dim + 2) times the float32 blocks
    d, float32_blocks = config.head_dim, size.num_blocks(bytes_per_block(config, 1, 16))
    assert stats.load.total_blocks == size.num_blocks(per_block)
    assert stats.load.total_blocks >= float32_blocks * 4 * d // (d + 2)
    with LLM(str(model), mode="colocated", kv_cache_dtype=kv_dtype, dtype="float32") as llm:
        colocated = llm.generate(prompts, params)
        assert llm.check_integrity() == 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in colocated]
    # the first token comes from the prefill's own (unquantized) K/V: transformers' exactly;
    # later ones attend over the compressed cache, where a random tiny model may drift
    assert [o.token_ids[0] for o in outs] == [r[0] for r in hf_greedy(model, prompts, 1)]


def _shared_prefix_prompts(vocab: int) -> tuple[list[int], list[list[int]]]:
    """A first prompt, then two that share its 64-token (4-block) prefix: one with another
    tail, one that is the prefix alone (block-aligned: cached whole)."""
    g = torch.Generator().manual_seed(1)
    prefix, tail_a, tail_b = (
        torch.randint(3, vocab, (n,), generator=g).tolist() for n in (64, 10, 13)
    )
    return [*prefix, *tail_a], [[*prefix, *tail_b], prefix]


@pytest.mark.parametrize(("tp", "caching"), [(1, True), (1, False)])
def test_a_shared_prefix_is_reused_not_sent(
    ray_session: None, tiny_dirs: dict[str, Path], tp: int, caching: bool
) -> None:
    """The second request's prefix KV is already on the decode replica: only the blocks after it
    cross the link (none for a prompt cached whole, whose first token still comes from the
    prefill), and greedy output is transformers' with prefix caching on and off."""
    model = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(
        str(model), prefill_tensor_parallel_size=tp, enable_prefix_caching=caching, dtype="float32"
    ) as llm:
        first, later = _shared_prefix_prompts(len(llm.tokenizer))
        outs = llm.generate([first], params) + llm.generate(later, params)  # first lands first
        stats = ray.get(llm.deployment.decode[0].stats.remote())
        assert llm.check_integrity() == 0
        per_block = 16 * llm.model_config.kv_bytes_per_token()
    blocks = [-(-len(p) // 16) for p in (first, *later)]  # 5, 6, 4
    reused = [0, 4, 4] if caching else [0, 0, 0]
    assert [o.metrics.kv_bytes for o in outs] == [
        (n - r) * per_block for n, r in zip(blocks, reused)
    ]
    assert [o.metrics.kv_reused_bytes for o in outs] == [r * per_block for r in reused]
    assert (stats.prefix_cache_hits, stats.cached_blocks > 0) == (
        (128, True) if caching else (0, False)
    )
    expected = hf_greedy(model, [first, *later], NEW_TOKENS)
    assert [o.token_ids for o in outs] == expected


@pytest.mark.parametrize("caching", [True, False])
def test_a_shared_prefix_is_not_recomputed_colocated(
    ray_session: None, tiny_dirs: dict[str, Path], caching: bool
) -> None:
    """Colocated, a prefix hit skips its compute (a prompt cached whole still computes its last
    block, whose logits give the first token); the output is transformers' either way."""
    model = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(str(model), mode="colocated", enable_prefix_caching=caching, dtype="float32") as llm:
        first, later = _shared_prefix_prompts(len(llm.tokenizer))
        outs = llm.generate([first], params) + llm.generate(later, params)
        assert llm.check_integrity() == 0
        per_block = 16 * llm.model_config.kv_bytes_per_token()
    reused = [0, 4, 3] if caching else [0, 0, 0]
    assert [o.metrics.kv_reused_bytes for o in outs] == [r * per_block for r in reused]
    assert all(o.metrics.kv_bytes == 0 for o in outs)
    assert [o.token_ids for o in outs] == hf_greedy(model, [first, *later], NEW_TOKENS)


def test_the_prefill_pools_prefix_cache_off_keeps_greedy_parity(
    ray_session: None, tiny_dirs: dict[str, Path]
) -> None:
    """The switch: with prefix caching off, nothing is cached on either pool and every block
    is sent, and greedy output is still transformers' (with it on: the arch x TP parity test)."""
    model = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(
        str(model), decode_instances=2, decode_policy="round_robin",
        enable_prefix_caching=False, dtype="float32",
    ) as llm:  # fmt: skip
        first, later = _shared_prefix_prompts(len(llm.tokenizer))
        outs = [llm.generate([p], params)[0] for p in (first, *later)]  # decode 0, 1, 0
        stats = ray.get(llm.deployment.prefill[0].leader.stats.remote())
        assert llm.check_integrity() == 0
        per_block = 16 * llm.model_config.kv_bytes_per_token()
    assert [o.metrics.cached_tokens for o in outs] == [0, 0, 0]
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (74 + 77 + 64, 0)
    assert stats.cache_blocks == 0
    assert [o.metrics.kv_bytes for o in outs] == [n * per_block for n in (5, 5, 4)]
    assert [o.token_ids for o in outs] == hf_greedy(model, [first, *later], NEW_TOKENS)


@pytest.mark.parametrize(
    ("arch", "tp", "keyword"),
    [("llama", 1, "prefill_chunked_prefill"), ("mistral", 2, "enable_chunked_prefill")],
)
def test_greedy_parity_chunked_prefill_pool(
    ray_session: None, tiny_dirs: dict[str, Path], arch: str, tp: int, keyword: str
) -> None:
    """64 tokens a prefill step: the 100- and 300-token prompts run in 2 and 5 chunks (on
    mistral through its 128-token sliding window), the short ones beside them; each chunk's
    blocks reach decode as a part of their own, and greedy output is the unchunked one's."""
    model = tiny_dirs[arch]
    knobs = {keyword: True, "max_batch_tokens": 64}
    with LLM(str(model), prefill_tensor_parallel_size=tp, dtype="float32", **knobs) as llm:
        assert llm.config.prefill is not None and llm.config.prefill.chunked_prefill
        prompts = parity_prompts(len(llm.tokenizer))
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params)
        assert llm.check_integrity() == 0
        per_block = 16 * llm.model_config.kv_bytes_per_token()
    assert [o.metrics.kv_bytes for o in outs] == [-(-len(p) // 16) * per_block for p in prompts]
    assert [o.token_ids for o in outs] == hf_greedy(model, prompts, NEW_TOKENS)


def test_cache_aware_prefill_routing_finds_the_instance_holding_the_prefix(
    ray_session: None, tiny_dirs: dict[str, Path]
) -> None:
    """Two prefill instances report their cache sizes; `cache_aware` sends the third prompt to
    the instance that prefilled the first (which shares its 4-block prefix), not to the idle one
    an unrelated prompt went to, and that instance computes only past the prefix."""
    model = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(str(model), prefill_instances=2, prefill_policy="cache_aware", dtype="float32") as llm:
        assert [p.cache_blocks > 0 for p in llm.deployment.router.prefill] == [True, True]
        first, (second, _) = _shared_prefix_prompts(len(llm.tokenizer))
        other = [(t * 7) % 200 + 3 for t in first]
        outs = [llm.generate([p], params)[0] for p in (first, other, second)]
        stats = [ray.get(p.leader.stats.remote()) for p in llm.deployment.prefill]
        assert llm.check_integrity() == 0
    assert [o.metrics.cached_tokens for o in outs] == [0, 0, 64]
    assert sorted(s.prefix_cache_hits for s in stats) == [0, 64]
    assert [o.token_ids for o in outs] == hf_greedy(model, [first, other, second], NEW_TOKENS)


def test_speculative_decoding_keeps_greedy_parity(
    ray_session: None, tiny_dirs: dict[str, Path]
) -> None:
    """n-gram speculation on the decode replica of a disaggregated deployment: drafts verified in
    the decode step, several tokens a delta, and the same greedy ids as transformers."""
    model = tiny_dirs["qwen2"]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "min_acceptance_rate": 0.0}  # fmt: skip
    with LLM(str(model), dtype="float32", speculative_config=spec) as llm:
        prompts = parity_prompts(len(llm.tokenizer))
        prompts.append(prompts[1] * 12)  # a prompt that repeats itself: lookups find matches
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params)
        stats = ray.get(llm.deployment.decode[0].stats.remote())
        assert llm.check_integrity() == 0
    assert stats.spec["spec_proposed"] > 0 and stats.spec["spec_verified"] > 0
    assert [o.token_ids for o in outs] == hf_greedy(model, prompts, NEW_TOKENS)
