"""Loading a Hugging Face tokenizer from a local directory and turning requests into token ids."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pdserve.engine.sampling_params import InvalidRequestError

logger = logging.getLogger(__name__)

# Any one of these marks a directory that AutoTokenizer can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerLoadError(ValueError):
    """The configured tokenizer path cannot be loaded; the message says what to fix."""


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer from a local model directory; never downloads."""
    from pdserve.engine.gguf_file import resolve_model_path  # it imports engine.config

    directory = Path(resolve_model_path(path))
    if not directory.is_dir():
        raise TokenizerLoadError(
            f"tokenizer path {path!r} is not a directory: point it at a local Hugging Face model "
            "directory (models are never downloaded from a hub)"
        )
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise TokenizerLoadError(
            f"no tokenizer files in {path!r}: expected one of {list(_TOKENIZER_FILES)}; copy the "
            "model's tokenizer files there, e.g. with tokenizer.save_pretrained(path)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TokenizerLoadError(
            f"could not load the tokenizer in {path!r}: {e}; check that its tokenizer files "
            "were saved by a compatible transformers version"
        ) from e
    logger.info("loaded tokenizer %s from %s", type(tokenizer).__name__, path)
    return tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[int]) -> list[int]:
    """Token ids for a prompt: text is encoded with the tokenizer's default special tokens (BOS);
    a list of token ids is checked and passed through unchanged."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        ids = _checked_ids(prompt, len(tokenizer))
    if not ids:
        raise InvalidRequestError("the prompt is empty: send at least one token of text")
    return list(ids)


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's template, ready for the reply."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError(
            "this model's tokenizer has no chat template, so /v1/chat/completions cannot format "
            "messages: send a plain prompt to /v1/completions, or serve a chat model whose "
            "tokenizer_config.json has a chat_template"
        )
    _check_messages(messages)
    # Render text, then encode without adding special tokens: the template writes BOS itself.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    return _encode_rendered(tokenizer, text)


def _encode_rendered(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise InvalidRequestError("the chat renders to an empty prompt: send at least one message")
    return list(ids)


def _checked_ids(prompt: Sequence[int], vocab_size: int) -> list[int]:
    ids = list(prompt)
    for i, token in enumerate(ids):
        # bool is an int subclass; true/false in a JSON token list is a client bug.
        if not isinstance(token, int) or isinstance(token, bool):
            raise InvalidRequestError(
                f"prompt token {i} is {token!r}: token-id prompts must be a list of integers"
            )
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                f"prompt token {i} is {token}, outside the vocabulary [0, {vocab_size})"
            )
    return ids


def _check_messages(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise InvalidRequestError("messages is empty: send at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(
                f"messages[{i}] must be an object with a string 'role' and 'content'"
            )
        if not isinstance(message.get("content"), str):
            raise InvalidRequestError(f"messages[{i}].content must be a string")
