"""A tiny byte-level BPE tokenizer for tests: trained in milliseconds, no download."""

from __future__ import annotations

import functools
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|eos|>"
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "hello",
    "world",
    "says",
    "naïve",
    "café",
    "crème",
    "brûlée",
    "日本語",
    "東京",
    "こんにちは",
    "中文",
    "🙂",
    "🚀",
    "👍🏽",
    "ß",
    "über",
    "Ωmega",
    "serving",
    "prefill",
    "decode",
    "token",
    "cache",
]
# vocab_size leaves the multi-byte characters mostly unmerged, so tokens split them.
VOCAB_SIZE = 320


@functools.lru_cache(maxsize=1)
def _train() -> Tokenizer:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh wrapper each call, so a test may set attributes (chat_template) freely."""
    return PreTrainedTokenizerFast(tokenizer_object=_train(), eos_token=EOS)


def byte_token_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One token per UTF-8 byte of text: every multi-byte character is split across tokens."""
    byte_to_char = _bytes_to_unicode()
    ids = tokenizer.convert_tokens_to_ids([byte_to_char[b] for b in text.encode("utf-8")])
    assert isinstance(ids, list)
    return ids


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's table, which ByteLevel uses: printable bytes stand for themselves, the rest for
    # chr(256 + n) in byte order.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table
