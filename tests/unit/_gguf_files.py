"""Tiny GGUF files written with gguf-py's GGUFWriter, as llama.cpp would lay them out.

Each has two layers, a real byte-level BPE tokenizer and a chat template in its metadata, and
tensors stored in every type pdserve dequantizes. gguf-py 0.19 can quantize F16, BF16, Q8_0,
Q4_0 and Q4_1 but not the K-quants, so Q4_K and Q6_K tensors are random well-formed blocks,
their scale fields set so the values come out near zero-mean at the wanted spread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = """\
The quick brown fox jumps over the lazy dog. Paris is the capital of France.
Once upon a time there was a small village at the edge of a great forest.
Every morning the baker opened his shop before the sun rose over the river.
Hello! How are you today? I am fine, thank you. What would you like to do?
Water boils at one hundred degrees, and it freezes at zero degrees Celsius.
A program reads input, does some work, and writes output; then it stops.
"""
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 2, 4, 2, 256  # 256: K-quant rows fit
STD = 0.2  # large weights make logits peaked, so float rounding never flips a greedy choice
# One tensor of each layer per type, so every file holds all eight types.
LAYER_TYPES = {
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.Q8_0,
    "attn_output": Q.F16,
    "ffn_gate": Q.BF16,
    "ffn_up": Q.Q8_0,
}
FFN_DOWN_TYPES = (Q.Q4_K, Q.Q6_K)  # layer 0, layer 1


@dataclass(frozen=True)
class TinyGGUF:
    """What distinguishes one architecture's tiny file."""

    arch: str  # general.architecture
    name: str  # general.name
    head_dim: int
    tied: bool  # no output.weight: the head reuses token_embd
    qkv_bias: bool
    qk_norm: bool


TINY_GGUFS = {
    "llama": TinyGGUF("llama", "tiny llama", 16, tied=False, qkv_bias=False, qk_norm=False),
    # llama.cpp converts Mistral checkpoints to the llama architecture.
    "mistral": TinyGGUF("llama", "tiny Mistral", 16, tied=True, qkv_bias=False, qk_norm=False),
    "qwen2": TinyGGUF("qwen2", "tiny qwen2", 16, tied=True, qkv_bias=True, qk_norm=False),
    # 128: transformers' GGUF config for qwen3 ignores key_length and keeps Qwen3Config's 128.
    "qwen3": TinyGGUF("qwen3", "tiny qwen3", 128, tied=False, qkv_bias=False, qk_norm=True),
}


@cache
def train_tokenizer(vocab_size: int = 384) -> Tokenizer:
    """A byte-level BPE, the kind GGUF stores as tokenizer.ggml.model = gpt2 (do not mutate)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    return tok


def _add_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer) -> None:
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(vocab["<|bos|>"])
    w.add_eos_token_id(vocab["<|eos|>"])
    w.add_eot_token_id(vocab["<|end|>"])
    w.add_pad_token_id(vocab["<|pad|>"])
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)


def _add_hparams(w: gguf.GGUFWriter, spec: TinyGGUF, rope_theta: float) -> None:
    w.add_name(spec.name)
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTERMEDIATE)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(rope_theta)
    if spec.arch == "llama":
        w.add_rope_dimension_count(spec.head_dim)
    else:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)


def _k_quant_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K bytes [rows, row_bytes] whose values have spread STD around zero."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_elems, block_bytes), dtype=np.uint8)

    def set_scales(scale: float) -> None:
        # Q4_K: d, dmin lead the block (value = d*sc*q - dmin*m, q in 0..15: dmin = 7.5 d
        # centres it); Q6_K: d ends it (value = d*scale*(q - 32)).
        fields = [(0, 1.0), (2, 7.5)] if qtype == Q.Q4_K else [(block_bytes - 2, 1.0)]
        for offset, ratio in fields:
            blocks[:, offset : offset + 2] = np.full(
                (len(blocks), 1), scale * ratio, np.float16
            ).view(np.uint8)

    set_scales(1.0)
    spread = float(gguf.quants.dequantize(blocks, qtype).std())
    set_scales(STD / spread)
    return blocks.reshape(rows, -1)


def _weight(qtype: Q, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Values of spread STD stored as `qtype` (float array, or block bytes [rows, row_bytes])."""
    if qtype in (Q.Q4_K, Q.Q6_K):
        return _k_quant_blocks(qtype, shape[0], shape[1], rng)
    values = (rng.standard_normal(shape) * STD).astype(np.float32)
    if qtype == Q.F32:
        return values
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:  # no quantizer in gguf-py: any bytes are well-formed blocks
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        # 0xBF clears each byte's bit 6, the top exponent bit of any float16 scale: no inf/NaN
        return rng.integers(0, 256, byte_shape, dtype=np.uint8) & np.uint8(0xBF)


def _layer_tensors(
    spec: TinyGGUF, i: int, rng: np.random.Generator, down_types: tuple[Q, Q]
) -> dict[str, tuple]:
    q_rows, kv_rows = HEADS * spec.head_dim, KV_HEADS * spec.head_dim
    shapes = {
        "attn_q": (q_rows, HIDDEN),
        "attn_k": (kv_rows, HIDDEN),
        "attn_v": (kv_rows, HIDDEN),
        "attn_output": (HIDDEN, q_rows),
        "ffn_gate": (INTERMEDIATE, HIDDEN),
        "ffn_up": (INTERMEDIATE, HIDDEN),
    }
    out = {f"blk.{i}.{n}.weight": (_weight(t, shapes[n], rng), t) for n, t in LAYER_TYPES.items()}
    down = down_types[i % 2]
    out[f"blk.{i}.ffn_down.weight"] = (_weight(down, (HIDDEN, INTERMEDIATE), rng), down)
    norms = {"attn_norm": HIDDEN, "ffn_norm": HIDDEN}
    if spec.qk_norm:
        norms |= {"attn_q_norm": spec.head_dim, "attn_k_norm": spec.head_dim}
    for n, size in norms.items():
        out[f"blk.{i}.{n}.weight"] = (1.0 + 0.1 * rng.standard_normal(size, np.float32), Q.F32)
    if spec.qkv_bias:
        for n, size in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
            out[f"blk.{i}.{n}.bias"] = (_weight(Q.F32, (size,), rng), Q.F32)
    return out


def tiny_tensors(
    arch: str | TinyGGUF, seed: int = 0, down_types: tuple[Q, Q] = FFN_DOWN_TYPES
) -> dict[str, tuple[np.ndarray, Q]]:
    """GGUF name -> (data, type) of a tiny model; ffn_down in `down_types` by layer."""
    spec = TINY_GGUFS[arch] if isinstance(arch, str) else arch
    vocab = train_tokenizer().get_vocab_size()
    rng = np.random.default_rng(seed)
    tensors = {"token_embd.weight": (_weight(Q.F16, (vocab, HIDDEN), rng), Q.F16)}
    for i in range(LAYERS):
        tensors.update(_layer_tensors(spec, i, rng, down_types))
    tensors["output_norm.weight"] = (1.0 + 0.1 * rng.standard_normal(HIDDEN, np.float32), Q.F32)
    if not spec.tied:
        tensors["output.weight"] = (_weight(Q.Q8_0, (vocab, HIDDEN), rng), Q.Q8_0)
    return tensors


def write_tiny_gguf(path: Path, arch: str, seed: int = 0) -> Path:
    """Write the tiny `arch` GGUF (llama, mistral, qwen2, qwen3) to `path`."""
    return write_gguf(path, TINY_GGUFS[arch], train_tokenizer(), tiny_tensors(arch, seed))


def write_gguf(
    path: Path,
    spec: TinyGGUF,
    tok: Tokenizer,
    tensors: dict[str, tuple[np.ndarray, Q]],
    rope_theta: float = 10000.0,
    experts: int = 0,
) -> Path:
    """Write metadata for `spec` and `tok`, then `tensors` (name -> (array or bytes, type))."""
    w = gguf.GGUFWriter(path, spec.arch)
    _add_hparams(w, spec, rope_theta)
    if experts:
        w.add_expert_count(experts)
    _add_tokenizer(w, tok)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
