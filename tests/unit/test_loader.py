"""Reading checkpoints: config resolution, load errors a user can act on, sharded and bf16 loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.engine.attention import PrefillMetadata
from pdserve.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelLoadError
from pdserve.engine.kv_cache import (
    allocate_kv_cache,
    bytes_per_block,
    kv_cache_shape,
    num_blocks_for_bytes,
)
from pdserve.engine.layers import Linear, RowParallelLinear
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _logits(model: CausalLM) -> torch.Tensor:
    ids = torch.arange(6, 46)
    return model.compute_logits(model(ids, torch.arange(40), PrefillMetadata([40])))


def test_unknown_directory_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelConfig.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_unsupported_architecture_lists_the_supported_ones(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = _copy(tiny_models["llama"], tmp_path / "m")
    _edit_config(model_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel") as err:
        ModelConfig.from_pretrained(str(model_dir))
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


def test_missing_tensor_is_named(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = _copy(tiny_models["llama"], tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    config = ModelConfig.from_pretrained(str(model_dir))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(config, TPGroup.single())


def test_config_that_does_not_match_the_weights_is_caught(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = _copy(tiny_models["llama"], tmp_path / "m")
    _edit_config(model_dir, intermediate_size=128)
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(ModelConfig.from_pretrained(str(model_dir)), TPGroup.single())
    # Qwen2 weights (with q/k/v bias) under a Llama config: the biases would be silently lost
    qwen_dir = _copy(tiny_models["qwen2"], tmp_path / "q")
    _edit_config(qwen_dir, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ModelLoadError, match="does not explain"):
        load_model(ModelConfig.from_pretrained(str(qwen_dir)), TPGroup.single())


def test_pickle_only_checkpoint_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = _copy(tiny_models["llama"], tmp_path / "m")
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(ModelConfig.from_pretrained(str(model_dir)), TPGroup.single())


def test_sharded_checkpoint_loads_the_same_logits(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    single = tiny_models["qwen3"]
    sharded = _copy(single, tmp_path / "sharded")
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    a = load_model(ModelConfig.from_pretrained(str(single)), TPGroup.single())
    b = load_model(ModelConfig.from_pretrained(str(sharded)), TPGroup.single(), progress=True)
    torch.testing.assert_close(_logits(a), _logits(b), rtol=0, atol=0)


def test_dtype_resolution(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = _copy(tiny_models["llama"], tmp_path / "m")
    _edit_config(model_dir, dtype="bfloat16")
    path = str(model_dir)
    # auto: float32 on CPU whatever the checkpoint says; the checkpoint's dtype on a GPU
    assert ModelConfig.from_pretrained(path).dtype == torch.float32
    assert ModelConfig.from_pretrained(path, device="cuda").dtype == torch.bfloat16
    assert ModelConfig.from_pretrained(path, dtype="float16").dtype == torch.float16
    _edit_config(model_dir, dtype="float32")  # e.g. a GGUF converted to float32: bf16 on a GPU
    assert ModelConfig.from_pretrained(path, device="cuda").dtype == torch.bfloat16
    assert ModelConfig.from_pretrained(path).dtype == torch.float32
    with pytest.raises(ModelLoadError, match="float64"):
        ModelConfig.from_pretrained(path, dtype="float64")


def test_bfloat16_model_loads_and_agrees_with_float32(tiny_models: dict[str, Path]) -> None:
    path = str(tiny_models["qwen2"])
    bf16 = load_model(ModelConfig.from_pretrained(path, dtype="bfloat16"), TPGroup.single())
    fp32 = load_model(ModelConfig.from_pretrained(path), TPGroup.single())
    assert bf16.embed_tokens.dtype == torch.bfloat16
    assert bf16.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    a, b = _logits(bf16), _logits(fp32)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_config_fields(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    llama = ModelConfig.from_pretrained(str(tiny_models["llama"]))
    assert llama.rope_scaling_dict is not None and llama.rope_scaling_dict["rope_type"] == "llama3"
    assert llama.max_model_len == llama.max_position_embeddings == 2048
    assert (
        ModelConfig.from_pretrained(str(tiny_models["llama"]), max_model_len=512).max_model_len
        == 512
    )
    with pytest.raises(ModelLoadError, match="max_model_len"):
        ModelConfig.from_pretrained(str(tiny_models["llama"]), max_model_len=4096)
    qwen3 = ModelConfig.from_pretrained(str(tiny_models["qwen3"]))
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.head_dim * qwen3.num_heads != 64
    qwen2 = ModelConfig.from_pretrained(str(tiny_models["qwen2"]))
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings
    # EOS ids: config.json's and generation_config.json's, int or list
    model_dir = _copy(tiny_models["llama"], tmp_path / "m")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    assert ModelConfig.from_pretrained(str(model_dir)).eos_token_ids == (1, 5)


def test_kv_cache_sizes(tiny_models: dict[str, Path]) -> None:
    config = ModelConfig.from_pretrained(str(tiny_models["qwen3"]))  # 2 layers, 2 KV heads of 32
    assert config.kv_bytes_per_token() == 2 * 2 * 2 * 32 * 4
    assert config.kv_bytes_per_token(tp_size=2) == config.kv_bytes_per_token() // 2
    assert config.kv_bytes_per_token(tp_size=4) == config.kv_bytes_per_token() // 2  # replicas
    assert kv_cache_shape(config, 2, num_blocks=10, block_size=16) == (2, 10, 2, 16, 1, 32)
    per_block = bytes_per_block(config, 1, 16)
    assert num_blocks_for_bytes(config, 1, 16, 10 * per_block + per_block - 1) == 10
    cache = allocate_kv_cache(config, 1, 3, 16, "cpu")
    assert cache.dtype == torch.float32 and cache.numel() * 4 == 3 * per_block


def _linear_weight_bytes(model: CausalLM) -> int:
    """Bytes the qkv/o/gate_up/down weights hold: float parameters or quantized buffers."""
    held: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, Linear | RowParallelLinear) and m.qweight is not None:
            held += list(m.qweight.buffers())
        elif isinstance(m, Linear | RowParallelLinear) and m.weight is not None:
            held.append(m.weight)
    return sum(t.numel() * t.element_size() for t in held)


def test_quantized_load_holds_quantized_linears_only(tiny_models: dict[str, Path]) -> None:
    path = str(tiny_models["llama"])
    loaded = {
        q: load_model(ModelConfig.from_pretrained(path, quantization=q), TPGroup.single())
        for q in ("none", "int8", "int4")
    }
    float_bytes = _linear_weight_bytes(loaded["none"]) / 4  # per weight: 4 bytes in float32
    # int8: a byte a weight plus a 2-byte scale per row (rows of 64+ columns here); int4: half
    # a byte plus a 2-byte scale and zero per group (groups of 22+ columns here)
    assert _linear_weight_bytes(loaded["int8"]) <= float_bytes * (1 + 2 / 64)
    assert _linear_weight_bytes(loaded["int4"]) <= float_bytes * (0.5 + 4 / 22)
    for q in ("int8", "int4"):
        model = loaded[q]
        attn = model.layers[0].self_attn
        assert attn.qkv_proj.weight is None and attn.o_proj.weight is None  # no float copy kept
        # embeddings, norms and the head stay as the checkpoint gave them
        assert model.embed_tokens.dtype == model.norm.weight.dtype == torch.float32


def test_bfloat16_model_loads_quantized(tiny_models: dict[str, Path]) -> None:
    path = str(tiny_models["qwen2"])  # with q/k/v biases, which stay in the model's dtype
    greedy = _logits(load_model(ModelConfig.from_pretrained(path), TPGroup.single())).argmax(-1)
    agree = {}
    for q in ("int8", "int4"):
        config = ModelConfig.from_pretrained(path, dtype="bfloat16", quantization=q)
        model = load_model(config, TPGroup.single())
        qkv = model.layers[0].self_attn.qkv_proj
        assert qkv.bias is not None and qkv.bias.dtype == torch.bfloat16
        logits = _logits(model)
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        agree[q] = float((logits.argmax(-1) == greedy).float().mean())
    # bf16 + int8 keeps float32's greedy choices as well as bf16 alone must (the test above)
    assert agree["int8"] > 0.8
