"""A tiny random-weight model plus a real byte-level BPE tokenizer, built locally in seconds.

It makes the default deployment and the tests run with no download. Weights are random, so
text is gibberish, but the checkpoint is a genuine Hugging Face directory (config.json,
safetensors, tokenizer.json, chat template) that transformers itself loads as the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pdserve.engine.built_dir import build_once
from pdserve.engine.envs import cache_dir

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
BUILDER_VERSION = 1  # bump when the recipe changes so cached builds are redone
MARKER = "pdserve_tiny.json"
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a small village at the edge of a great forest. The people of the village
grew wheat and barley, kept goats and bees, and told stories by the fire when the nights were long.
Every morning the baker opened his shop before the sun rose, and the smell of fresh bread drifted
down the narrow streets. Children ran to school, dogs barked at the carts, and the river kept flowing.
Hello! How are you today? I am fine, thank you. What would you like to do this afternoon?
We could walk to the park, read a book in the library, or cook dinner together with our friends.
The weather is cold and windy, so please bring a warm coat, a scarf, and an umbrella just in case.
Science is the patient work of asking questions, making measurements, and changing your mind.
Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees.
The earth turns around the sun once a year, and the moon turns around the earth about once a month.
Computers follow instructions written by people. A program reads input, does some work, and writes
output. When the program has a bug, the engineer reads the code again, writes a test, and fixes it.
A good question is half of the answer. Numbers like 1, 2, 3, 42, 100 and 2024 appear in many texts.
The user asked the assistant a question, and the assistant answered politely and clearly.
Music, painting, and poetry help people share what they feel. Some songs are happy and some are sad.
In the evening the market closed, the lamps were lit, and the travellers found rooms at the inn.
She said that the meeting would start at nine o'clock, but nobody arrived before half past nine.
They planted trees along the road, and after many years the trees gave shade to everyone walking by.
"""


def _train_tokenizer(vocab_size: int = 768) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    bos = SPECIAL_TOKENS[0]
    # Like Llama tokenizers: plain encoding prepends <|bos|> (the chat template writes it itself).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def _hf_config(arch: str, vocab_size: int, tok: Tokenizer) -> PretrainedConfig:
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        # Large weights make logits peaked, so float rounding never flips a greedy choice.
        initializer_range=0.2,
        bos_token_id=tok.token_to_id("<|bos|>"),
        eos_token_id=tok.token_to_id("<|eos|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
    )
    if arch == "llama":
        rope = dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        )
        return LlamaConfig(**common, rope_parameters=rope, architectures=["LlamaForCausalLM"])
    if arch == "qwen2":  # q/k/v bias, tied embeddings
        return Qwen2Config(**common, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    if arch == "qwen3":  # q/k norm, head_dim not hidden/heads
        return Qwen3Config(**common, head_dim=32, architectures=["Qwen3ForCausalLM"])
    if arch == "mistral":  # window shorter than the 300-token test prompt
        return MistralConfig(**common, sliding_window=128, architectures=["MistralForCausalLM"])
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")


_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "mistral": MistralForCausalLM,
}


def _perturb(model: PreTrainedModel) -> None:
    # HF initialises biases to 0 and norm weights to 1; randomise them so a bug there shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def _build(out: Path, arch: str, seed: int) -> None:
    tok = _train_tokenizer()
    config = _hf_config(arch, tok.get_vocab_size(), tok)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[arch](config)
        _perturb(model)
    model.save_pretrained(str(out))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        extra_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=2048,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out))


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Build a tiny `arch` checkpoint into out_dir; reuse it when already built with these args."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")
    stamp = {"arch": arch, "seed": seed, "version": BUILDER_VERSION}
    return build_once(
        Path(out_dir), MARKER, stamp, lambda tmp: _build(tmp, arch, seed), "pdserve tiny model"
    )


def default_tiny_model(arch: str = "llama", seed: int = 0) -> Path:
    """The tiny model in the pdserve cache directory (built on first use)."""
    return make_tiny_model(cache_dir() / f"tiny-{arch}-s{seed}", arch, seed)
