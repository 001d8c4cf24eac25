"""Helpers shared by the integration tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM

PROMPT_LENS = (1, 7, 100, 300)
NEW_TOKENS = 32


def parity_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' own greedy ids, one prompt at a time (no padding), EOS ignored. Each
    (model, prompt, length) is generated once per session: many tests check the same prompts."""
    return [list(_hf_greedy(str(model_dir), tuple(ids), new_tokens)) for ids in prompts]


@functools.cache
def _hf_model(model_dir: str) -> Any:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


@functools.cache
def _hf_greedy(model_dir: str, ids: tuple[int, ...], new_tokens: int) -> tuple[int, ...]:
    with torch.inference_mode():
        seq = _hf_model(model_dir).generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens
        )
    return tuple(seq[0, len(ids) :].tolist())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deploy_spec(path: str, name: str, model: Path, **overrides: dict[str, Any]) -> dict[str, Any]:
    """A deploy/ YAML as a dict with a unique name, a free port and a given model."""
    spec: dict[str, Any] = yaml.safe_load(Path(path).read_text())
    spec["name"] = name
    spec["model"]["path"] = str(model)
    spec["model"]["served_name"] = "tiny-llama"
    # the shipped files serve SmolLM2 in bfloat16; tests compare tiny models with transformers'
    # float32 token for token
    spec["model"]["dtype"] = "float32"
    spec.setdefault("server", {})["port"] = free_port()
    for section, values in overrides.items():
        spec.setdefault(section, {}).update(values)
    return spec
