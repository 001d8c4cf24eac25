"""Greedy generation two ways, for parity: pdserve's engine on a converted directory, and
transformers' own GGUF loading (the reference), both in float32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from pdserve.engine.attention import DecodeMetadata, PrefillMetadata
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup


def pdserve_greedy(model_dir: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy tokens from pdserve's CausalLM, per prompt: prefill a paged cache, then decode."""
    model = load_model(ModelConfig.from_pretrained(str(model_dir)), TPGroup.single())
    return [_greedy(model, prompt, max_new) for prompt in prompts]


def _greedy(model: CausalLM, prompt: list[int], max_new: int) -> list[int]:
    n, block = len(prompt), 16
    blocks = -(-(n + max_new) // block)
    cache = allocate_kv_cache(model.config, 1, blocks, block, "cpu")
    table = torch.arange(blocks)[None]  # block i holds positions [16 i, 16 i + 16): slot = position
    with torch.inference_mode():
        meta = PrefillMetadata([n], torch.arange(n))
        hidden = model(torch.tensor(prompt), torch.arange(n), meta, cache)
        out = [int(model.compute_logits(hidden[-1:]).argmax(-1))]
        for pos in range(n, n + max_new - 1):
            step = DecodeMetadata(table, torch.tensor([pos + 1]), torch.tensor([pos]))
            hidden = model(torch.tensor(out[-1:]), torch.tensor([pos]), step, cache)
            out.append(int(model.compute_logits(hidden).argmax(-1)))
    return out


def hf_gguf_greedy(path: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy tokens from transformers loading the GGUF file itself (the reference)."""
    hf: Any = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    hf.generation_config.eos_token_id = None  # always max_new tokens, as our loop does
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_new)  # fmt: skip
        outs.append(out[0, len(prompt) :].tolist())
    return outs
