"""The pieces of a Hugging Face model directory, built from one GGUF file read by gguf-py.

config.json comes from the file's `{arch}.*` metadata, the way transformers' GGUF loader maps it,
plus what that loader drops (Qwen3's head_dim from `attention.key_length`, RoPE scaling, the
end-of-turn ids). Tensors are dequantized to float32 by `gguf.quants.dequantize` and renamed to
transformers' names; llama-architecture q/k rows are un-permuted as llama.cpp's converter
permuted them. The tokenizer is transformers' own GGUF tokenizer conversion, saved.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from pdserve.engine.config import ModelLoadError
from pdserve.engine.gguf_reader import GGUF_ARCHITECTURES, field
from pdserve.engine.gguf_rope import ROPE_FREQS, rope_scaling

SHARD_BYTES = 4 << 30  # float32 bytes per safetensors file
# {arch}.<key> every file must state
_HPARAMS = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.layer_norm_rms_epsilon",
)
_CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _scalar(reader: gguf.GGUFReader, key: str, path: Path, default: Any = None) -> Any:
    """Metadata `key` (or `default` when absent; None: required), refusing per-layer lists."""
    value = field(reader, key)
    if value is None and default is None:
        raise ModelLoadError(f"{path} lacks metadata key {key!r}; the file is incomplete")
    if value is None:
        return default
    if isinstance(value, list):
        raise ModelLoadError(
            f"{path} gives per-layer values for {key!r}, which pdserve cannot serve"
        )
    return value


def hf_config(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """transformers config kwargs (model_type included) from the file's metadata and tensors."""
    arch = str(field(reader, "general.architecture"))
    hp = {k: _scalar(reader, f"{arch}.{k}", path) for k in _HPARAMS}
    heads, hidden = int(hp["attention.head_count"]), int(hp["embedding_length"])
    kv_heads = _scalar(reader, f"{arch}.attention.head_count_kv", path, default=heads)
    head_dim = _head_dim(reader, arch, hidden // heads, path)
    theta = float(field(reader, f"{arch}.rope.freq_base") or 10000.0)
    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ModelLoadError(f"{path} has no token_embd.weight tensor; the file is incomplete")
    model_type = GGUF_ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [_CAUSAL_LM[model_type]],
        "vocab_size": int(embed.shape[1]),  # ggml order: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(hp["feed_forward_length"]),
        "num_hidden_layers": int(hp["block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(hp["attention.layer_norm_rms_epsilon"]),
        "max_position_embeddings": int(hp["context_length"]),
        "rope_theta": theta,
        "rope_scaling": rope_scaling(reader, arch, head_dim, theta, path),
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",  # what model.safetensors holds
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in names
    return config


def _head_dim(reader: gguf.GGUFReader, arch: str, default: int, path: Path) -> int:
    """key_length when stated (Qwen3's head_dim is not hidden/heads), else RoPE's width."""
    key_len = field(reader, f"{arch}.attention.key_length")
    value_len = field(reader, f"{arch}.attention.value_length")
    rope_dims = field(reader, f"{arch}.rope.dimension_count")
    head_dim = int(key_len or rope_dims or default)
    if value_len is not None and int(value_len) != head_dim:
        raise ModelLoadError(
            f"{path} has key heads of {head_dim} and value heads of {value_len} dimensions; "
            "pdserve needs them equal"
        )
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ModelLoadError(
            f"{path} rotates {rope_dims} of {head_dim} head dimensions; partial rotary "
            "embeddings are not supported"
        )
    return head_dim


def write_config(reader: gguf.GGUFReader, path: Path, out: Path) -> dict[str, Any]:
    """config.json and generation_config.json (every end-of-generation id) into `out`."""
    config = hf_config(reader, path)
    AutoConfig.for_model(**config).save_pretrained(str(out))
    # llama.cpp stops at end-of-turn/end-of-message too; a chat model's EOS alone may never come.
    ids = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = [int(i) for i in dict.fromkeys(ids) if i is not None]
    generation = GenerationConfig(
        bos_token_id=config["bos_token_id"], eos_token_id=eos, pad_token_id=config["pad_token_id"]
    )
    generation.save_pretrained(str(out))
    return config


def write_tokenizer(reader: gguf.GGUFReader, path: Path, out: Path) -> None:
    """transformers' GGUF tokenizer (vocab, merges, special tokens, chat template), saved to
    `out`, adding BOS/EOS as the file says (tokenizer.ggml.add_bos_token / add_eos_token, as
    llama.cpp does): transformers before 5.2x read neither flag, so a llama GGUF lost its BOS."""
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except (ValueError, KeyError, OSError) as e:
        raise ModelLoadError(f"transformers cannot build a tokenizer from {path}: {e}") from e
    for special in ("bos", "eos"):
        flag = field(reader, f"tokenizer.ggml.add_{special}_token")
        if flag is not None:
            setattr(tok, f"add_{special}_token", bool(flag))
    tok.save_pretrained(str(out))


def hf_tensor_name(gguf_name: str) -> str | None:
    """transformers' name for a GGUF tensor (blk.0.attn_q.weight -> model.layers.0...)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m is None or m[2] not in _LAYER_NAMES:
        return None
    return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permute: each head's rotary halves were interleaved row by row."""
    # rows: [heads * head_dim, ...] -> [heads, head_dim/2, 2, ...] -> [heads, 2, head_dim/2, ...]
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def dequantized(tensor: gguf.ReaderTensor, config: dict[str, Any], arch: str) -> torch.Tensor:
    """One GGUF tensor as float32 in transformers' layout ([out, in] for a weight)."""
    shape = tuple(reversed([int(d) for d in tensor.shape]))  # ggml lists the fastest dim first
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    if arch == "llama" and ".attn_q." in tensor.name:
        values = _unpermute(values, config["num_attention_heads"])
    elif arch == "llama" and ".attn_k." in tensor.name:
        values = _unpermute(values, config["num_key_value_heads"])
    return torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file is mmapped


def _shards(tensors: list[gguf.ReaderTensor]) -> list[list[gguf.ReaderTensor]]:
    """Tensors grouped into files of at most SHARD_BYTES of float32 (one tensor may exceed it)."""
    shards: list[list[gguf.ReaderTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = 4 * int(t.n_elements)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def write_tensors(
    reader: gguf.GGUFReader, config: dict[str, Any], path: Path, out: Path, progress: bool
) -> None:
    """model.safetensors (or shards plus their index) in float32, transformers' names."""
    tensors = [t for t in reader.tensors if t.name != ROPE_FREQS]  # folded into rope_scaling
    unknown = [t.name for t in tensors if hf_tensor_name(t.name) is None]
    if unknown:
        raise ModelLoadError(
            f"{path} holds {len(unknown)} tensor(s) a {config['model_type']} model does not have, "
            f"e.g. {unknown[:3]}; pdserve serves dense llama, qwen2 and qwen3 GGUFs only"
        )
    arch = str(field(reader, "general.architecture"))
    shards = _shards(tensors)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    with tqdm(total=len(tensors), desc=f"converting {path.name}", disable=not progress) as bar:
        for file, shard in zip(files, shards, strict=True):
            converted = {}
            for t in shard:
                converted[str(hf_tensor_name(t.name))] = dequantized(t, config, arch)
                bar.update()
            save_file(converted, str(out / file), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(converted, file)
    if len(files) > 1:
        total = 4 * sum(int(t.n_elements) for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
