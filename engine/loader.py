"""Load a safetensors checkpoint into CausalLM, each TP rank reading only its own slices.

Never torch.load or pickle: a checkpoint is data, not code. Each parameter of the model is
assembled from one or more checkpoint tensors (fused q/k/v and gate/up), each maybe sliced.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from pdserve.engine.config import ModelConfig, ModelLoadError
from pdserve.engine.layers import Linear, RowParallelLinear
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup, kv_head_range

logger = logging.getLogger(__name__)

# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Piece:
    """Rows or columns [start, end) of checkpoint tensor `name` along `dim` (None: all of it)."""

    name: str
    shape: tuple[int, ...]  # full shape the checkpoint must have
    dim: int | None = None
    start: int = 0
    end: int = 0


def _shard(name: str, shape: tuple[int, ...], dim: int, start: int, end: int) -> Piece:
    return Piece(name, shape, dim, start, end)


def _attention_pieces(c: ModelConfig, tp: TPGroup, i: int) -> dict[str, list[Piece]]:
    pre, d, hid = f"model.layers.{i}.self_attn", c.head_dim, c.hidden_size
    q_per_rank = c.num_heads // tp.size
    q0, q1 = tp.rank * q_per_rank * d, (tp.rank + 1) * q_per_rank * d
    kv_start, kv_end = kv_head_range(c.num_kv_heads, tp.rank, tp.size)
    k0, k1 = kv_start * d, kv_end * d
    q_rows, kv_rows = c.num_heads * d, c.num_kv_heads * d
    ours = f"layers.{i}.self_attn"
    out = {
        f"{ours}.qkv_proj.weight": [
            _shard(f"{pre}.q_proj.weight", (q_rows, hid), 0, q0, q1),
            _shard(f"{pre}.k_proj.weight", (kv_rows, hid), 0, k0, k1),
            _shard(f"{pre}.v_proj.weight", (kv_rows, hid), 0, k0, k1),
        ],
        f"{ours}.o_proj.weight": [_shard(f"{pre}.o_proj.weight", (hid, q_rows), 1, q0, q1)],
    }
    if c.qkv_bias:
        out[f"{ours}.qkv_proj.bias"] = [
            _shard(f"{pre}.q_proj.bias", (q_rows,), 0, q0, q1),
            _shard(f"{pre}.k_proj.bias", (kv_rows,), 0, k0, k1),
            _shard(f"{pre}.v_proj.bias", (kv_rows,), 0, k0, k1),
        ]
    if c.o_bias:
        out[f"{ours}.o_proj.bias"] = [Piece(f"{pre}.o_proj.bias", (hid,))]
    if c.qk_norm:
        out[f"{ours}.q_norm.weight"] = [Piece(f"{pre}.q_norm.weight", (d,))]
        out[f"{ours}.k_norm.weight"] = [Piece(f"{pre}.k_norm.weight", (d,))]
    return out


def _mlp_pieces(c: ModelConfig, tp: TPGroup, i: int) -> dict[str, list[Piece]]:
    pre, hid, inter = f"model.layers.{i}.mlp", c.hidden_size, c.intermediate_size
    per_rank = inter // tp.size
    r0, r1 = tp.rank * per_rank, (tp.rank + 1) * per_rank
    ours = f"layers.{i}.mlp"
    out = {
        f"{ours}.gate_up_proj.weight": [
            _shard(f"{pre}.gate_proj.weight", (inter, hid), 0, r0, r1),
            _shard(f"{pre}.up_proj.weight", (inter, hid), 0, r0, r1),
        ],
        f"{ours}.down_proj.weight": [_shard(f"{pre}.down_proj.weight", (hid, inter), 1, r0, r1)],
    }
    if c.mlp_bias:
        out[f"{ours}.gate_up_proj.bias"] = [
            _shard(f"{pre}.gate_proj.bias", (inter,), 0, r0, r1),
            _shard(f"{pre}.up_proj.bias", (inter,), 0, r0, r1),
        ]
        out[f"{ours}.down_proj.bias"] = [Piece(f"{pre}.down_proj.bias", (hid,))]
    return out


def checkpoint_pieces(config: ModelConfig, tp: TPGroup) -> dict[str, list[Piece]]:
    """Our parameter name -> the checkpoint pieces concatenated (on dim 0) to make it."""
    hid, vocab = config.hidden_size, config.vocab_size
    out = {
        "embed_tokens": [Piece("model.embed_tokens.weight", (vocab, hid))],
        "norm.weight": [Piece("model.norm.weight", (hid,))],
    }
    if not config.tie_word_embeddings:
        out["lm_head"] = [Piece("lm_head.weight", (vocab, hid))]
    for i in range(config.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"layers.{i}.{norm}.weight"] = [Piece(f"model.layers.{i}.{norm}.weight", (hid,))]
        out.update(_attention_pieces(config, tp, i))
        out.update(_mlp_pieces(config, tp, i))
    return out


def weight_map(model_dir: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the .safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in mapping.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_dir} has no *.safetensors weights; pdserve never unpickles .bin/.pt files. "
            "Convert with model.save_pretrained(dir, safe_serialization=True)"
        )
    out: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


def _read_piece(handle: Any, piece: Piece) -> torch.Tensor:
    sliced = handle.get_slice(piece.name)
    shape = tuple(sliced.get_shape())
    if shape != piece.shape:
        raise ModelLoadError(
            f"checkpoint tensor {piece.name} has shape {list(shape)} but config.json implies "
            f"{list(piece.shape)}; the weights and config.json do not belong together"
        )
    if piece.dim is None:
        return sliced[:]
    if piece.dim == 0:
        return sliced[piece.start : piece.end]
    return sliced[:, piece.start : piece.end]


def _check_coverage(config: ModelConfig, files: dict[str, Path], wanted: set[str]) -> None:
    missing = sorted(wanted - set(files))
    if missing:
        raise ModelLoadError(
            f"checkpoint {config.path} lacks {len(missing)} tensor(s) {config.architecture} "
            f"needs, e.g. {missing[:3]}"
        )
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unused = sorted(n for n in set(files) - wanted - ignorable if not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        raise ModelLoadError(
            f"checkpoint {config.path} has {len(unused)} tensor(s) config.json does not explain, "
            f"e.g. {unused[:3]}; check attention_bias / mlp_bias / architectures"
        )


def _weight_setters(model: CausalLM, device: torch.device) -> dict[str, Callable[[Any], Any]]:
    """Our parameter name -> what stores a checkpoint tensor under it.

    A parameter is copied into; a quantized linear's weight (which has no float parameter)
    is quantized from its float shard on `device`, one layer at a time, so a float copy of
    the whole model never exists.
    """
    setters: dict[str, Callable[[Any], Any]] = {
        name: param.copy_ for name, param in model.named_parameters()
    }
    for name, module in model.named_modules():
        if isinstance(module, Linear | RowParallelLinear) and module.qweight is not None:
            setters[f"{name}.weight"] = functools.partial(_quantize_into, module, device)
    return setters


def _quantize_into(
    module: Linear | RowParallelLinear, device: torch.device, w: torch.Tensor
) -> None:
    module.load_quantized(w.to(device))


def load_model(
    config: ModelConfig,
    tp: TPGroup,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> CausalLM:
    """Build CausalLM on `device` for this TP rank and fill it from the checkpoint's safetensors.

    With config.quantization int8/int4, each rank quantizes the linears' shards it reads.
    """
    model_dir = Path(config.path)
    files = weight_map(model_dir)
    pieces = checkpoint_pieces(config, tp)
    _check_coverage(config, files, {p.name for ps in pieces.values() for p in ps})
    with torch.device(device):
        model = CausalLM(config, tp)
    setters = _weight_setters(model, torch.device(device))
    assert set(setters) == set(pieces), set(setters) ^ set(pieces)
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        # Every rank walks the pieces in one order: int8 row-parallel loads all-reduce.
        for name in tqdm(pieces, desc="loading weights", disable=not progress):
            parts = []
            for piece in pieces[name]:
                file = files[piece.name]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                parts.append(_read_piece(handles[file], piece))
            setters[name](torch.cat(parts) if len(parts) > 1 else parts[0])
    logger.info(
        "loaded %s (TP rank %d/%d) on %s, weights %s",
        config.path, tp.rank, tp.size, device, config.quantization,
    )  # fmt: skip
    return model.eval()
