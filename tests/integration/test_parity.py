"""Greedy parity with transformers through the real Ray path: prefill actor(s) -> gloo KV link
-> decode actor, for every supported architecture, TP=1 and TP=2 prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_helpers import NEW_TOKENS, hf_greedy, parity_prompts

from pdserve.cluster import LLM, SamplingParams
from pdserve.engine.tiny_model import TINY_ARCHS

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_parity_with_transformers(
    ray_session: None, tiny_dirs: dict[str, Path], arch: str, tp: int
) -> None:
    model = tiny_dirs[arch]
    with LLM(str(model), prefill_tensor_parallel_size=tp, dtype="float32") as llm:
        prompts = parity_prompts(len(llm.tokenizer))
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params)  # one mixed batch: 1, 7, 100 and 300 tokens
        assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
        # every head of every layer, whole 16-token blocks, summed over the TP ranks' links
        per_block = 16 * llm.model_config.kv_bytes_per_token()
        assert [o.metrics.kv_bytes for o in outs] == [-(-len(p) // 16) * per_block for p in prompts]
        # the wait for the KV sends after the forward is timed on every batch, within prefill
        assert all(0 < o.metrics.kv_wait_s <= o.metrics.prefill_s for o in outs)
        assert llm.deployment.decode and llm.check_integrity() == 0
    expected = hf_greedy(model, prompts, NEW_TOKENS)
    for n, out, ref in zip(map(len, prompts), outs, expected):
        assert out.token_ids == ref, f"{arch} TP={tp}, prompt of {n} tokens diverged"


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
