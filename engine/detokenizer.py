"""Incremental detokenization: output token ids in, valid UTF-8 text deltas out."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# What a decoder writes for bytes that are not (yet) a whole UTF-8 character.
_REPLACEMENT = "\ufffd"
# Prompt tokens decoded in front of the first output tokens, so that decoders whose output
# depends on the previous token (SentencePiece's leading space) render them as they read after
# the prompt. vLLM uses the same number.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas at O(new tokens) per call.

    Only a window of recent ids is decoded. ids[prefix_offset:read_offset] is text already
    emitted, kept as context; ids[read_offset:] is pending. The delta is
    decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset]). While the pending
    text ends in bytes of an unfinished character (decoded as U+FFFD), those are held back and
    the window does not move; once the pending text ends cleanly the window slides forward.

    The concatenated deltas (plus flush() if the output ends mid-character) equal
    tokenizer.decode(output ids) for byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 style). For
    SentencePiece-style tokenizers the first token keeps the leading space it has after the
    prompt, which decode(output ids) alone would strip, as in vLLM.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(_REPLACEMENT):
            # The prompt ends mid-character (ids given by the caller): aligning the output's
            # text against it is ill-defined, so decode the output on its own.
            context = []
        self._ids = context  # prompt context, then the output ids
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._emitted_pending = 0  # characters of the pending text already emitted
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """Full output text emitted so far (prompt not included)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def token_ids(self) -> list[int]:
        """Output token ids so far."""
        return self._ids[self._num_context :]

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the new text that is complete UTF-8."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        pending = self._pending_text()
        complete = pending.rstrip(_REPLACEMENT)  # hold back an unfinished character
        delta = complete[self._emitted_pending :]
        if pending and complete == pending:
            # Slide only past tokens that produced text, so the window keeps real context
            # (a skipped special token alone would not give SentencePiece its leading space).
            self._slide_window()
        else:
            self._emitted_pending += len(delta)
        return self._emit(delta)

    def flush(self) -> str:
        """On finish: release held-back bytes of an unfinished character (as U+FFFD), so the
        text equals tokenizer.decode(output ids)."""
        delta = self._pending_text()[self._emitted_pending :]
        self._slide_window()
        return self._emit(delta)

    def _pending_text(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        return window_text[len(prefix_text) :]

    def _slide_window(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._emitted_pending = 0

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special_tokens)
        assert isinstance(text, str)
        return text
