"""ModelConfig: what the engine needs to know about a local Hugging Face checkpoint, read once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from pdserve.engine.deploy_config import ModelSettings
from pdserve.engine.parallel import kv_head_range

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
# For config.json files that name no architectures, only a model_type.
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelLoadError(ValueError):
    """A checkpoint directory or load option the engine cannot use; the message says why."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one checkpoint, normalised across Llama, Mistral, Qwen2 and Qwen3."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # items of the scaling dict, incl. rope_type
    max_position_embeddings: int
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: (
        int | None
    )  # each query sees the last `sliding_window` positions, itself included
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype: torch.dtype
    quantization: str = "none"  # weight-only scheme the loader applies: none, int8, int4

    @classmethod
    def of(cls, model: ModelSettings) -> ModelConfig:
        """The config of a deployment's model, as its settings load it."""
        return cls.from_pretrained(
            model.path,
            dtype=model.dtype,
            device=model.device,
            max_model_len=model.max_model_len,
            quantization=model.quantization,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        max_model_len: int | None = None,
        quantization: str = "none",
    ) -> ModelConfig:
        """Read `path`/config.json (and generation_config.json for extra EOS ids)."""
        from pdserve.engine.gguf_file import resolve_model_path  # not at the top: it imports us

        root = Path(resolve_model_path(path))
        architecture = _read_architecture(root)
        try:
            hf = AutoConfig.from_pretrained(str(root))
        except (ValueError, OSError, KeyError) as e:
            raise ModelLoadError(f"transformers cannot read {root / 'config.json'}: {e}") from e
        max_pos = int(hf.max_position_embeddings)
        rope_theta, rope_scaling = _rope(hf)
        bias = bool(getattr(hf, "attention_bias", False))
        qwen2 = architecture == "Qwen2ForCausalLM"
        num_heads = int(hf.num_attention_heads)
        return cls(
            path=str(root),
            architecture=architecture,
            vocab_size=int(hf.vocab_size),
            hidden_size=int(hf.hidden_size),
            num_layers=int(hf.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or num_heads),
            head_dim=int(getattr(hf, "head_dim", None) or hf.hidden_size // num_heads),
            intermediate_size=int(hf.intermediate_size),
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            max_model_len=_max_model_len(max_model_len, max_pos),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=True if qwen2 else bias,  # Qwen2 always has q/k/v bias and no o bias
            o_bias=False if qwen2 else bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            sliding_window=_sliding_window(hf, architecture),
            eos_token_ids=_eos_ids(root, hf),
            bos_token_id=hf.bos_token_id if isinstance(hf.bos_token_id, int) else None,
            dtype=_resolve_dtype(dtype, device, hf),
            quantization=quantization,
        )

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ModelLoadError(
                f"{self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    def kv_heads_local(self, tp_size: int = 1) -> int:
        start, end = kv_head_range(self.num_kv_heads, 0, tp_size)
        return end - start

    def kv_bytes_per_token(self, tp_size: int = 1) -> int:
        """Bytes of K and V, all layers, for the KV heads one rank holds."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads_local(tp_size) * self.head_dim * itemsize


def _read_architecture(root: Path) -> str:
    if not root.is_dir():
        raise ModelLoadError(f"model directory {root} does not exist")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{root} has no config.json; point to a Hugging Face model directory")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file} is not valid JSON: {e}") from e
    declared = raw.get("architectures") or [_ARCH_BY_MODEL_TYPE.get(raw.get("model_type"))]
    for arch in declared:
        if arch in SUPPORTED_ARCHITECTURES:
            return str(arch)
    raise ModelLoadError(
        f"{config_file} declares architectures {declared} (model_type "
        f"{raw.get('model_type')!r}); supported are "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(hf: PretrainedConfig) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, scaling items or None) from v5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and params:
        scaling = dict(params)
        theta = float(scaling.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    else:
        theta = float(getattr(hf, "rope_theta", 10000.0))
        scaling = dict(getattr(hf, "rope_scaling", None) or {})
    if any(isinstance(v, dict) for v in scaling.values()):
        raise ModelLoadError("per-layer RoPE parameters are not supported")
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"RoPE type {rope_type!r} is not supported; supported are {SUPPORTED_ROPE_TYPES}"
        )
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelLoadError("partial rotary embeddings are not supported")
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings", hf.max_position_embeddings)
    return theta, tuple(sorted({"rope_type": rope_type, **scaling}.items()))


def _sliding_window(hf: PretrainedConfig, architecture: str) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if architecture == "LlamaForCausalLM" or window is None:
        return None
    if architecture == "MistralForCausalLM":
        return int(window)
    # Qwen2/3 slide only on the layers `layer_types` marks (or above max_window_layers in v4).
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is None:
        if not getattr(hf, "use_sliding_window", False):
            return None
        layer_types = [
            "sliding_attention" if i >= hf.max_window_layers else "full_attention"
            for i in range(hf.num_hidden_layers)
        ]
    sliding = {t == "sliding_attention" for t in layer_types}
    if sliding == {False}:
        return None
    if sliding == {True}:
        return int(window)
    raise ModelLoadError(
        "checkpoints mixing sliding-window and full-attention layers are not supported"
    )


def _max_model_len(requested: int | None, max_pos: int) -> int:
    if requested is None:
        return max_pos
    if not 1 <= requested <= max_pos:
        raise ModelLoadError(
            f"max_model_len={requested} must be between 1 and the model's "
            f"max_position_embeddings ({max_pos})"
        )
    return requested


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _eos_ids(root: Path, hf: PretrainedConfig) -> tuple[int, ...]:
    ids = _as_id_list(getattr(hf, "eos_token_id", None))
    gen_file = root / "generation_config.json"
    if gen_file.is_file():
        ids += _as_id_list(json.loads(gen_file.read_text()).get("eos_token_id"))
    return tuple(dict.fromkeys(ids))  # union, first-seen order


def _checkpoint_dtype(hf: PretrainedConfig) -> torch.dtype:
    value = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    return torch.float32


def _resolve_dtype(dtype: str, device: str, hf: PretrainedConfig) -> torch.dtype:
    if dtype == "auto":
        # CPU half-precision matmuls are slow and lossy, so CPU runs in float32.
        if torch.device(device).type == "cpu":
            return torch.float32
        # On GPUs the checkpoint's dtype, but a float32 checkpoint (a GGUF converted to
        # float32, say) runs in bfloat16, as vLLM does: float32 would halve the throughput.
        saved = _checkpoint_dtype(hf)
        return torch.bfloat16 if saved == torch.float32 else saved
    if dtype not in _DTYPES:
        raise ModelLoadError(
            f"dtype {dtype!r} is not one of 'auto', {', '.join(map(repr, _DTYPES))}"
        )
    return _DTYPES[dtype]
