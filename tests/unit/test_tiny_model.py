"""The built-in tiny model: reproducible, reused once built, with a working tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pdserve.engine.config import ModelConfig
from pdserve.engine.tiny_model import default_tiny_model, make_tiny_model


def test_same_seed_same_weights_and_rebuild_is_skipped(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", "llama", seed=3)
    b = make_tiny_model(tmp_path / "b", "llama", seed=3)
    c = make_tiny_model(tmp_path / "c", "llama", seed=4)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert wa[name].equal(wb[name]) and not wa[name].equal(wc[name])
    assert (a / "tokenizer.json").read_text() == (c / "tokenizer.json").read_text()
    before = (a / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_model(tmp_path / "a", "llama", seed=3) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == before
    # other arguments in the same directory: rebuilt, not reused
    make_tiny_model(tmp_path / "a", "mistral", seed=3)
    assert json.loads((a / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a pdserve tiny model"):
        make_tiny_model(tmp_path / "x")
    with pytest.raises(ValueError, match="unknown tiny arch"):
        make_tiny_model(tmp_path / "y", arch="gpt2")


def test_default_model_lives_in_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    path = default_tiny_model("qwen2", seed=1)
    assert path == tmp_path / "tiny-qwen2-s1"
    assert ModelConfig.from_pretrained(str(path)).architecture == "Qwen2ForCausalLM"


def test_tokenizer_round_trips_and_has_a_chat_template(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    config = ModelConfig.from_pretrained(str(path))
    assert 512 <= len(tok) <= 1000 and len(tok) == config.vocab_size
    assert tok.eos_token == "<|eos|>" and tok.eos_token_id in config.eos_token_ids
    assert tok.bos_token_id == config.bos_token_id
    text = "Hello world! Numbers 1, 2, 42 and unicode: héllo 🙂"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) < len(text.encode())  # BPE merges, not just bytes
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == ("<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi<|eos|>\n<|assistant|>\n")
    # role markers are single special tokens
    assert tok.convert_tokens_to_ids("<|assistant|>") in tok(rendered)["input_ids"]


def test_architecture_features(tiny_models: dict[str, Path]) -> None:
    configs = {a: ModelConfig.from_pretrained(str(p)) for a, p in tiny_models.items()}
    assert configs["mistral"].sliding_window == 128
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 32
    assert configs["qwen2"].qkv_bias and configs["qwen2"].tie_word_embeddings
    assert configs["llama"].rope_scaling is not None
    for c in configs.values():
        assert c.num_heads == 4 and c.num_kv_heads == 2 and c.max_position_embeddings == 2048
