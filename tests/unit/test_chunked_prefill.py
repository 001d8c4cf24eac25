"""Chunked prefill on the real model, in process: mixed steps (decode tokens + prompt chunks in
one forward) generate exactly what transformers generates (float32, greedy), sliding window and
preemption included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from _colocated import ColocatedEngine
from transformers import AutoModelForCausalLM

from pdserve.cluster import LLM
from pdserve.cluster.config.spec import SpecError
from pdserve.decode_worker.runner import DecodeRunner
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup
from pdserve.engine.tiny_model import TINY_ARCHS

PROMPT_LENS = (1, 7, 100, 300)
MAX_NEW = 32
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    # test_model_parity's prompts: along every reference trajectory the top-2 logits differ by
    # far more than float32 rounding, so parity cannot flip on the order of the sums
    g = torch.Generator().manual_seed(4)
    return [torch.randint(6, 768, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    hf: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for p in prompts:
            seq = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW)
            out.append(seq[0, len(p) :].tolist())
    return out


def chunked_greedy(
    model_dir: Path, prompts: list[list[int]], budget: int, num_blocks: int
) -> tuple[list[list[int]], ColocatedEngine, list[Any]]:
    config = ModelConfig.from_pretrained(str(model_dir))
    cache = allocate_kv_cache(config, 1, num_blocks, BLOCK_SIZE, "cpu")
    runner = DecodeRunner(
        load_model(config, TPGroup.single()), cache, BLOCK_SIZE, torch.device("cpu")
    )
    engine = ColocatedEngine(
        budget=budget,
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        max_model_len=max(PROMPT_LENS) + MAX_NEW,
        runner=runner,
    )
    for i, p in enumerate(prompts):
        engine.submit(i, p, max_tokens=MAX_NEW)
    records = engine.run()
    return [engine.outputs[i] for i in range(len(prompts))], engine, records


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chunked_prefill_matches_transformers(
    arch: str, tiny_models: dict[str, Path], prompts: list[list[int]]
) -> None:
    # 64 tokens a step: the 300-token prompt takes several chunks, each continuing the last
    # (and, on mistral, reaching back only a 128-token window), while the short ones decode
    outs, _, records = chunked_greedy(tiny_models[arch], prompts, budget=64, num_blocks=64)
    assert any(r.decode and r.chunks for r in records)
    assert max(r.num_tokens for r in records) <= 64
    assert outs == hf_greedy(tiny_models[arch], prompts)


def test_preemption_with_chunked_prefill_matches_transformers(
    tiny_models: dict[str, Path], prompts: list[list[int]]
) -> None:
    # 30 blocks of 16 tokens hold the four prompts (28 blocks) but not all of their outputs (36)
    outs, engine, records = chunked_greedy(tiny_models["llama"], prompts, budget=64, num_blocks=30)
    assert engine.preemptions > 0 and any(r.recompute for r in records)
    assert outs == hf_greedy(tiny_models["llama"], prompts)


def test_llm_options_are_checked_before_anything_starts(tiny_models: dict[str, Path]) -> None:
    # LLM(...) keywords go through the deploy spec's validation; errors name the keyword
    model = str(tiny_models["llama"])
    with pytest.raises(SpecError, match="max_num_batched_tokens: only applies in colocated mode"):
        LLM(model, enable_chunked_prefill=True, max_num_batched_tokens=512)
    with pytest.raises(SpecError, match=r"max_batch_tokens: must be at least decode\.block_size"):
        LLM(model, enable_chunked_prefill=True, max_batch_tokens=8)  # the prefill pool chunks
    with pytest.raises(
        SpecError, match=r"max_num_batched_tokens: must be at least max_num_seqs \(64\)"
    ):
        LLM(model, mode="colocated", enable_chunked_prefill=True, max_num_batched_tokens=32)
    with pytest.raises(SpecError, match="prefill_tensor_parallel_size: must be >= 1"):
        LLM(model, prefill_tensor_parallel_size=0)
    with pytest.raises(TypeError, match="did you mean 'max_num_seqs'"):
        LLM(model, max_num_seq=8)
    assert not ray.is_initialized()
