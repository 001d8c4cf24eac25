"""What a request's prompt holds: random token ids of an exact length, or real English text.

Token ids (every workload but `chat`, on /v1/completions) give exact lengths without a
tokenizer. Text (the `chat` workload, and every workload on /v1/chat/completions, since a
chat turn holds text) is a slice of public-domain prose shipped with pdserve
(bench/data/public_domain.txt), starting at a sentence and opened by one of a few requests
("Summarize the following passage: ..."), cut to the planned length in the served model's
tokens (`bench.serve.tokens`). A prompt longer than the prose wraps around to its start.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdserve.bench.serve.tokens import TextTokens

PASSAGE_FILE = Path(__file__).resolve().parents[1] / "data" / "public_domain.txt"
INSTRUCTIONS = (
    "Summarize the following passage in a few sentences.",
    "Continue this story from where the passage ends.",
    "Answer: who speaks in the following passage, and what do they want?",
    "Rewrite the following passage in plain modern English.",
    "List the main events of the following passage.",
)
MIN_PASSAGE_TOKENS = 8  # below this much room the instruction is left out: the passage alone
_SENTENCE_END = re.compile(r"[.!?:][\"')]*$")
_ABBREVIATION = re.compile(r"^(Mr|Mrs|Dr|St)\.$")  # ends with a period, ends no sentence


@dataclass(frozen=True)
class TextPrompt:
    """One text prompt and the tokens the server will count for it (with the template)."""

    text: str
    tokens: int

    def with_overhead(self, tokens: int) -> TextPrompt:
        return TextPrompt(self.text, self.tokens + tokens)


def prompt_token_ids(
    lengths: Sequence[int], seed: int, id_range: tuple[int, int]
) -> list[list[int]]:
    """Random prompts as token ids in [low, high): exact lengths, no tokenizer round trip."""
    low, high = id_range
    if not 0 <= low < high:
        raise ValueError(f"token id range {low}-{high} must be LOW-HIGH with 0 <= LOW < HIGH")
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=n).tolist() for n in lengths]


@functools.lru_cache(maxsize=2)
def load_passage(path: Path = PASSAGE_FILE) -> str:
    """The prose of a passage file: its leading `#` header lines and blank lines dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(lines).strip()


class TextPrompts:
    """Text prompts of planned lengths, counted and cut in one tokenizer's tokens."""

    def __init__(self, tokens: TextTokens, passage: str | None = None) -> None:
        self.tokens = tokens
        # pieces: each word with the whitespace after it, so a slice keeps paragraph breaks
        self.pieces = re.findall(r"\S+\s*", passage if passage is not None else load_passage())
        if not self.pieces:
            raise ValueError("the passage holds no words")
        self.starts = [0] + [i + 1 for i, p in enumerate(self.pieces[:-1]) if _ends_sentence(p)]

    def make(self, lengths: Sequence[int], seed: int, whole: bool = True) -> list[TextPrompt]:
        """One prompt per length: about that many tokens as the server counts them, never more
        (unless the template alone is longer). Deterministic in the seed. Not `whole`: pieces
        of longer prompts (a conversation's messages), counted alone, without what the server
        adds around a prompt."""
        rng = np.random.default_rng(seed)
        overhead = self.tokens.overhead if whole else 0
        return [
            self._one(
                n - overhead,
                int(rng.integers(len(INSTRUCTIONS))),
                int(rng.integers(len(self.starts))),
            ).with_overhead(overhead)
            for n in lengths
        ]

    def passages(self, lengths: Sequence[int], seed: int) -> list[str]:
        """Plain prose of about each length in tokens, no request around it (shared prefixes:
        system prompts). Deterministic in the seed."""
        rng = np.random.default_rng(seed)
        return [self._one(n, None, int(rng.integers(len(self.starts)))).text for n in lengths]

    def _one(self, length: int, instruction: int | None, start: int) -> TextPrompt:
        """Text of at most `length` tokens (at least 1), opened by an instruction if one fits."""
        budget = max(1, length)  # tokens of the text itself
        head = "" if instruction is None else INSTRUCTIONS[instruction] + "\n\n"
        room = budget - self.tokens.count(head)
        if room < MIN_PASSAGE_TOKENS:
            head, room = "", budget
        window = self._window(self.starts[start], room)
        text = head + self.tokens.cut(window, room)
        count = self.tokens.count(text)
        while count > budget and room > 1:  # a cut's ends can merge into other tokens
            room = max(1, room - (count - budget))
            text = head + self.tokens.cut(window, room)
            count = self.tokens.count(text)
        return TextPrompt(text, count)

    def _window(self, start: int, tokens: int) -> str:
        """Words from `start` on, wrapping around: enough to hold `tokens` tokens (a word is
        at least one token)."""
        n = len(self.pieces)
        words = tokens + 8
        return "".join(self.pieces[(start + i) % n] for i in range(words)).strip()


def _ends_sentence(piece: str) -> bool:
    word = piece.strip()
    return bool(_SENTENCE_END.search(word)) and not _ABBREVIATION.match(word)
