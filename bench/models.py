"""The engine benchmarks' models: random-weight checkpoints built locally (never downloaded), the
real built-in SmolLM2, and loaders that give pdserve and transformers the very same weights.

`small` is Llama-shaped and big enough that compute, not Python overhead, dominates on a CPU:
hidden 512, 8 layers, 8 heads / 4 KV heads, vocab 32000, about 58M parameters in float32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from pdserve.engine.built_dir import build_once
from pdserve.engine.builtin_models import BUILTIN_PREFIX, DEFAULT_MODEL, builtin_path, is_builtin
from pdserve.engine.config import ModelConfig
from pdserve.engine.envs import cache_dir
from pdserve.engine.gguf_file import resolve_model_path
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.tiny_model import default_tiny_model

MARKER = "pdserve_bench_model.json"
BUILTIN_MODELS = ("tiny", "small")
SHORT_NAMES = {"smollm2": BUILTIN_PREFIX + DEFAULT_MODEL}  # --model smollm2
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class BenchModelSpec:
    """Shape of a random Llama checkpoint built for benchmarking."""

    hidden_size: int = 512
    intermediate_size: int = 1536
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    seed: int = 0
    version: int = 1  # bump when the recipe changes so cached builds are redone

    def hf_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=1e-6,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            architectures=["LlamaForCausalLM"],
        )


def make_bench_model(out_dir: str | Path, spec: BenchModelSpec | None = None) -> Path:
    """Build a random Llama checkpoint (config.json + safetensors) into out_dir; reuse it when
    already built from the same spec."""
    chosen = spec or BenchModelSpec()
    return build_once(
        Path(out_dir),
        MARKER,
        asdict(chosen),
        lambda tmp: _build(tmp, chosen),
        "pdserve bench model",
    )


def _build(out: Path, spec: BenchModelSpec) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(spec.hf_config())
    model.save_pretrained(str(out))


def resolve_model(name: str) -> Path:
    """The checkpoint directory of --model `name`: `tiny` (the built-in test model), `small`
    (built into the cache dir), `smollm2` or any `builtin:<name>`, a Hugging Face checkpoint
    dir, or a .gguf file. GGUF files (SmolLM2's included) resolve to the directory they are
    converted into once, which both pdserve and transformers then read: the very same weights."""
    if name == "tiny":
        return default_tiny_model()
    if name == "small":
        return make_bench_model(cache_dir() / "bench-small-llama")
    name = SHORT_NAMES.get(name, name)
    if is_builtin(name):
        return Path(resolve_model_path(str(builtin_path(name))))
    path = Path(name).expanduser()
    if path.is_file():  # a GGUF file: its converted directory (any other file stays itself)
        path = Path(resolve_model_path(str(path)))
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model {name!r} is neither one of {(*BUILTIN_MODELS, *SHORT_NAMES)} nor a "
            "directory with a config.json nor a .gguf file; pass tiny, small, smollm2, "
            "builtin:<name>, a local Hugging Face checkpoint or a GGUF file"
        )
    return path


def servable_model(name: str) -> Path:
    """The directory of bench model `name` (tiny, small), with a tokenizer so a server loads it.

    The tiny model has its own tokenizer. `small` has none: the benchmark client sends token
    ids and counts the tokens streamed back, so any tokenizer covering the whole vocabulary
    serves, and a word-level one ("t<id>" per id) is written into the checkpoint once.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"servable_model builds {BUILTIN_MODELS} only, got {name!r}")
    path = resolve_model(name)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    if name != "tiny" and not _has_id_tokenizer(path, vocab):
        id_tokenizer(vocab).save_pretrained(str(path))  # replaces a smaller borrowed one
    return path


def _has_id_tokenizer(path: Path, vocab_size: int) -> bool:
    file = path / "tokenizer.json"
    if not file.is_file():
        return False
    model = json.loads(file.read_text()).get("model", {})
    return model.get("type") == "WordLevel" and len(model.get("vocab", {})) == vocab_size


def id_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One word per id: <|pad|> 0, <|bos|> 1, <|eos|> 2 (BenchModelSpec's ids), then t3, t4, ...;
    every id decodes to non-empty text, as a streaming server needs to emit it."""
    special = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2}
    words = special | {f"t{i}": i for i in range(len(special), vocab_size)}
    tok = Tokenizer(WordLevel(words, unk_token="<|pad|>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def load_pdserve(path: Path, dtype: str = "float32", quantization: str = "none") -> CausalLM:
    """pdserve's model in `dtype` (one of DTYPES) on the CPU, single rank, its weights
    quantized by `quantization` (model.quantization: none, int8, int4)."""
    config = ModelConfig.from_pretrained(str(path), dtype=dtype, quantization=quantization)
    return load_model(config, TPGroup.single())


def load_hf(path: Path, dtype: str = "float32") -> PreTrainedModel:
    """transformers' model of the same checkpoint in `dtype` on the CPU (the baseline)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model holds: parameters and buffers (quantized weights and their scales)."""
    tensors = list(model.parameters()) + list(model.buffers())
    unique = {t.data_ptr(): t for t in tensors}  # a tied head shares the embedding's storage
    return sum(t.numel() * t.element_size() for t in unique.values())


def num_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
