"""Counting and cutting prompt text in the served model's tokens, as `vllm bench serve` does
with its `--tokenizer` (default: the model).

The tokenizer is `--tokenizer` (a local model directory, a GGUF file or `builtin:NAME`), else
the served model's id read as a local directory or a built-in model name. Without one the
bench estimates 4/3 tokens a word, warns, and records `"tokenizer": null`: the server's
usage counts, which every record keeps, stay exact.

`overhead` is what the server adds around a prompt's text: the BOS token on /v1/completions,
the chat template's tokens on /v1/chat/completions (a system prompt, role markers), measured
with the server's own encoding functions, so a text planned at n tokens arrives as n.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TOKENS_PER_WORD = 4 / 3  # English prose in BPE vocabularies, when no tokenizer is found


class TokenizerNotFound(ValueError):
    """--tokenizer names nothing loadable; the message says what to pass."""


@dataclass(frozen=True)
class TextTokens:
    """A tokenizer as the bench uses it; `tokenizer` None: estimates from words."""

    name: str | None = None  # what was loaded (--tokenizer or the model's path); None: estimate
    tokenizer: Any = None  # a Hugging Face tokenizer
    overhead: int = 0  # tokens the server adds around the text

    def count(self, text: str) -> int:
        """Tokens of `text` alone (no special tokens)."""
        if self.tokenizer is None:
            return math.ceil(len(text.split()) * TOKENS_PER_WORD)
        return len(self._encode(text))

    def cut(self, text: str, n: int) -> str:
        """The start of `text`, about n tokens long (a cut's ends may merge differently)."""
        if self.tokenizer is None:
            return " ".join(text.split()[: max(1, math.floor(n / TOKENS_PER_WORD))])
        decoded = self.tokenizer.decode(self._encode(text)[:n])
        assert isinstance(decoded, str)
        return decoded

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def find_tokens(name: str | None, model_id: str, chat: bool) -> TextTokens:
    """The served model's tokenizer (see the module docstring), or the words estimate.

    Raises TokenizerNotFound when `name` (--tokenizer) cannot be loaded."""
    if name is not None:
        try:
            return _with_overhead(name, _load(name), chat)
        except (ValueError, OSError) as exc:
            raise TokenizerNotFound(
                f"--tokenizer {name!r}: {exc}; pass a local model directory, a GGUF file or "
                "builtin:NAME, or leave --tokenizer out to estimate lengths from words"
            ) from exc
    for candidate in _candidates(model_id):
        try:
            return _with_overhead(candidate, _load(candidate), chat)
        except (ValueError, OSError) as exc:
            logger.warning("tokenizer of %s (%s) did not load: %s", model_id, candidate, exc)
    logger.warning(
        "no tokenizer found for model %r: text prompt lengths are estimated (%.2f tokens a "
        "word; the server's counts are exact); pass --tokenizer DIR for exact ones",
        model_id,
        TOKENS_PER_WORD,
    )
    return TextTokens()


def _candidates(model_id: str) -> list[str]:
    from pdserve.engine.builtin_models import BUILTIN_MODELS, BUILTIN_PREFIX

    found = [model_id] if Path(model_id).expanduser().exists() else []
    name = model_id.removeprefix(BUILTIN_PREFIX)
    if name in BUILTIN_MODELS:
        found.append(BUILTIN_PREFIX + name)
    return found


@functools.lru_cache(maxsize=4)
def _load(name: str) -> Any:
    """A Hugging Face tokenizer from a directory, a GGUF file or builtin:NAME (imports
    transformers, so only when text prompts need it)."""
    from pdserve.engine.builtin_models import builtin_path, is_builtin
    from pdserve.engine.tokenizer import load_tokenizer

    return load_tokenizer(str(builtin_path(name)) if is_builtin(name) else name)


def _with_overhead(name: str, tokenizer: Any, chat: bool) -> TextTokens:
    """The tokens the server adds around a text, measured on a one-word prompt with the
    server's own functions (engine.tokenizer); 0 for chat without a template (the server
    refuses such requests, and says why)."""
    from pdserve.engine.tokenizer import apply_chat_template, encode_prompt

    bare = TextTokens(name, tokenizer)
    word = "Hello"
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            return bare
        full = len(apply_chat_template(tokenizer, [{"role": "user", "content": word}]))
    else:
        full = len(encode_prompt(tokenizer, word))
    return TextTokens(name, tokenizer, max(0, full - bare.count(word)))
