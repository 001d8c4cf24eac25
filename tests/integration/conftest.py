"""Integration fixtures: one real local Ray instance per session, tiny checkpoints, references."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from pdserve.engine.tiny_model import TINY_ARCHS, make_tiny_model

PROMPT_LENS = (1, 7, 100, 300)
NEW_TOKENS = 32


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray instance with logical CPU slots for every actor the tests start at once."""
    ray.init(
        num_cpus=max(8, os.cpu_count() or 1),
        include_dashboard=False,
        namespace="pdserve-tests",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(root / arch, arch, seed=0) for arch in TINY_ARCHS}


def parity_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' own greedy ids, one prompt at a time (no padding), EOS ignored."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    out = []
    with torch.inference_mode():
        for ids in prompts:
            seq = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens)
            out.append(seq[0, len(ids) :].tolist())
    return out
