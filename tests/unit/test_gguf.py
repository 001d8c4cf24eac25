"""GGUF files served as converted Hugging Face directories: pdserve generates what transformers'
own GGUF loading generates (float32, greedy), and unsupported files are refused up front."""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from _gguf_files import (
    CHAT_TEMPLATE,
    TINY_GGUFS,
    tiny_tensors,
    train_tokenizer,
    write_gguf,
    write_tiny_gguf,
)
from _gguf_greedy import hf_gguf_greedy, pdserve_greedy
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pdserve.engine import gguf_convert, gguf_file
from pdserve.engine.config import ModelConfig, ModelLoadError
from pdserve.engine.gguf_file import materialize_gguf, resolve_model_path
from pdserve.engine.gguf_reader import SUPPORTED_TYPES
from pdserve.engine.gguf_rope import llama3_from_divisors
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup
from pdserve.engine.tokenizer import apply_chat_template, load_tokenizer

ARCHS = tuple(TINY_GGUFS)
MAX_NEW = 16
TEXTS = ("Hello world", "  Paris is the capital of France.\nNew line!", "caf\u00e9 \u2615 42")


@pytest.fixture(scope="module")
def gguf_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {arch: write_tiny_gguf(root / f"tiny-{arch}.gguf", arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def converted(gguf_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    cache = tmp_path_factory.mktemp("gguf-cache")
    return {arch: materialize_gguf(p, cache, progress=False) for arch, p in gguf_paths.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_gguf_loading(
    arch: str, gguf_paths: dict[str, Path], converted: dict[str, Path]
) -> None:
    tok = train_tokenizer()
    story = [tok.token_to_id("<|bos|>"), *tok.encode("Once upon a time there was").ids]
    noise = torch.randint(
        6, tok.get_vocab_size(), (40,), generator=torch.Generator().manual_seed(1)
    )
    ours = pdserve_greedy(converted[arch], [story, noise.tolist()], MAX_NEW)
    assert all(len(set(out)) > 2 for out in ours), "degenerate model: parity would prove little"
    assert ours == hf_gguf_greedy(gguf_paths[arch], [story, noise.tolist()], MAX_NEW)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_matches_transformers_gguf_config(
    arch: str, gguf_paths: dict[str, Path], converted: dict[str, Path]
) -> None:
    ours = AutoConfig.from_pretrained(str(converted[arch]), local_files_only=True)
    path = gguf_paths[arch]
    ref = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_parameters",
            "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id")  # fmt: skip
    assert {k: getattr(ours, k) for k in keys} == {k: getattr(ref, k) for k in keys}
    spec = TINY_GGUFS[arch]
    config = ModelConfig.from_pretrained(str(converted[arch]))
    assert (config.head_dim, config.tie_word_embeddings) == (spec.head_dim, spec.tied)
    assert (config.qkv_bias, config.qk_norm) == (spec.qkv_bias, spec.qk_norm)
    assert config.sliding_window is None  # llama.cpp's llama architecture never slides


def test_big_models_are_sharded_with_an_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gguf_paths: dict, converted: dict
) -> None:
    monkeypatch.setattr(gguf_convert, "SHARD_BYTES", 100_000)  # the tiny model: ~1 MB
    out = materialize_gguf(gguf_paths["qwen2"], tmp_path, progress=False)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    assert (out / "model.safetensors.index.json").is_file()
    sharded = load_model(ModelConfig.from_pretrained(str(out)), TPGroup.single()).state_dict()
    whole = load_model(ModelConfig.from_pretrained(str(converted["qwen2"])), TPGroup.single())
    assert sharded.keys() == whole.state_dict().keys()
    assert all(torch.equal(sharded[k], v) for k, v in whole.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # transformers picks different classes
def test_tokenizer_round_trips_with_chat_template_and_special_tokens(
    arch: str, gguf_paths: dict[str, Path], converted: dict[str, Path]
) -> None:
    tok = load_tokenizer(str(converted[arch]))
    path, raw = gguf_paths[arch], train_tokenizer()
    ref = AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )
    bos, end = raw.token_to_id("<|bos|>"), raw.token_to_id("<|end|>")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text) == [bos, *raw.encode(text).ids]
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert tok.chat_template == CHAT_TEMPLATE
    chat = apply_chat_template(tok, [{"role": "user", "content": "Hello!"}])
    assert chat == [bos, *raw.encode("<|user|>\nHello!<|end|>\n<|assistant|>\n").ids]
    assert tok.convert_ids_to_tokens(chat[1]) == "<|user|>"  # a special token stays whole
    # llama.cpp stops at end-of-turn too: generation_config carries it beside EOS
    assert ModelConfig.from_pretrained(str(converted[arch])).eos_token_ids == (
        raw.token_to_id("<|eos|>"),
        end,
    )


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_every_supported_type_dequantizes_as_gguf_does(qtype: Q, tmp_path: Path) -> None:
    tensors = tiny_tensors("llama", down_types=(qtype, Q.F32))
    path = write_gguf(tmp_path / "t.gguf", TINY_GGUFS["llama"], train_tokenizer(), tensors)
    out = materialize_gguf(path, tmp_path / "cache", progress=False)
    data, _ = tensors["blk.0.ffn_down.weight"]
    want = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(64, 256).astype(np.float32))
    got = load_file(out / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unsupported_tensor_type_is_refused_naming_it(tmp_path: Path) -> None:
    tensors = tiny_tensors("llama", down_types=(Q.IQ4_NL, Q.Q6_K))
    path = write_gguf(tmp_path / "iq.gguf", TINY_GGUFS["llama"], train_tokenizer(), tensors)
    with pytest.raises(ModelLoadError) as e:
        materialize_gguf(path, tmp_path / "cache", progress=False)
    for part in (str(path), "IQ4_NL", "blk.0.ffn_down.weight", "Supported: F32", "Q4_K", "Q6_K"):
        assert part in str(e.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # refused up front


def test_unsupported_architecture_is_refused_naming_it(tmp_path: Path) -> None:
    spec = dataclasses.replace(TINY_GGUFS["llama"], arch="gpt2")
    path = write_gguf(tmp_path / "g.gguf", spec, train_tokenizer(), tiny_tensors("llama"))
    with pytest.raises(ModelLoadError, match=r"g\.gguf holds a 'gpt2' model.*llama, qwen2, qwen3"):
        materialize_gguf(path, tmp_path / "cache", progress=False)
    moe = write_gguf(tmp_path / "moe.gguf", TINY_GGUFS["llama"], train_tokenizer(),
                     tiny_tensors("llama"), experts=8)  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"moe\.gguf is a mixture-of-experts llama model"):
        materialize_gguf(moe, tmp_path / "cache", progress=False)


def test_qwen3_head_dim_comes_from_key_length(tmp_path: Path) -> None:
    # transformers' GGUF config drops qwen3.attention.key_length and assumes 128
    spec = dataclasses.replace(TINY_GGUFS["qwen3"], head_dim=32)
    path = write_gguf(tmp_path / "q3.gguf", spec, train_tokenizer(), tiny_tensors(spec))
    out = materialize_gguf(path, tmp_path / "cache", progress=False)
    config = ModelConfig.from_pretrained(str(out))
    assert config.head_dim == 32
    [tokens] = pdserve_greedy(out, [[6, 7, 8]], 4)  # the shapes load and run
    assert len(tokens) == 4


def test_a_path_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text('{"not": "gguf"}')
    with pytest.raises(ModelLoadError, match=r"model\.gguf is not a GGUF file"):
        resolve_model_path(str(fake), tmp_path)
    with pytest.raises(ModelLoadError, match=r"missing\.gguf does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"), tmp_path)
    assert resolve_model_path(str(tmp_path), tmp_path) == str(tmp_path)  # a directory: unchanged


def test_workers_convert_once_and_reuse_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tiny_gguf(tmp_path / "m.gguf", "qwen2")
    cache, real, calls = tmp_path / "cache", gguf_file._convert, []

    def counting(*args: Any) -> None:
        calls.append(args)
        time.sleep(0.2)  # let the other workers arrive while this one converts
        real(*args)

    monkeypatch.setattr(gguf_file, "_convert", counting)
    with ThreadPoolExecutor(4) as pool:
        outs = set(pool.map(lambda _: resolve_model_path(str(src), cache), range(4)))
    assert len(outs) == 1 and len(calls) == 1
    out = Path(outs.pop())
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [out.name]  # no temp dirs
    assert materialize_gguf(src, cache, progress=False) == out and len(calls) == 1
    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    assert materialize_gguf(src, cache, progress=False) != out and len(calls) == 2


def test_failed_conversion_leaves_nothing_that_looks_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tiny_gguf(tmp_path / "m.gguf", "llama")

    def crash(*args: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_file, "write_tensors", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        materialize_gguf(src, tmp_path / "cache", progress=False)
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []
    monkeypatch.undo()
    assert (materialize_gguf(src, tmp_path / "cache", progress=False) / "config.json").is_file()


def _llama3_divisors(theta: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """rope_freqs the way llama.cpp derives them: plain inverse frequencies / transformers' llama3."""
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=
                         131072, rope_parameters={"rope_theta": theta, **scaling})  # fmt: skip
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (plain / scaled.double()).numpy()


def test_llama3_parameters_are_recovered_from_rope_freqs(tmp_path: Path) -> None:
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    divisors = _llama3_divisors(500000.0, 128, llama31).astype(np.float32)
    got = llama3_from_divisors(divisors, 500000.0, 128, 131072, Path("x.gguf"))
    assert got is not None and got.pop("rope_type") == llama31.pop("rope_type")
    assert got == pytest.approx(llama31, rel=1e-4)
    # end to end: a tiny llama carrying rope_freqs converts to a config with the same frequencies
    tiny = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 8.0, "original_max_position_embeddings": 256}  # fmt: skip
    divisors = _llama3_divisors(10000.0, 16, tiny).astype(np.float32)
    tensors = tiny_tensors("llama") | {"rope_freqs.weight": (divisors, Q.F32)}
    path = write_gguf(tmp_path / "l3.gguf", TINY_GGUFS["llama"], train_tokenizer(), tensors)
    out = materialize_gguf(path, tmp_path / "cache", progress=False)
    scaling = ModelConfig.from_pretrained(str(out)).rope_scaling_dict
    assert scaling is not None and scaling["rope_type"] == "llama3"
    hf_config = AutoConfig.from_pretrained(str(out), local_files_only=True)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(inv_freq.double(), plain / torch.from_numpy(divisors).double())
