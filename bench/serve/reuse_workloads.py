"""Workloads whose prompts share prefixes, to exercise prefix caching and cache-aware routing.

- `shared-prefix` (SGLang's generated-shared-prefix): `groups` long prefixes (system prompts of
  `system` tokens); each request is one group's prefix and a question of its own, the groups
  interleaved at random, sent at the request rate like any open-loop workload.
- `multi-turn`: conversations of up to `turns` turns behind one system prompt of `system` tokens
  (every conversation's: an application's). Each turn's prompt is the previous turns (the user
  messages and the model's actual answers) and a new user message; a turn is sent when the
  previous answer is back (closed loop per conversation), so only the first turns follow the
  request rate, scaled to rate x conversations / requests so the offered request rate is the
  rate while answers come back quickly. `--num-prompts` requests spread evenly over
  `conversations` conversations (default: enough for `turns` turns each).

Both are text workloads (real prose through the served model's tokenizer, as `chat`); a
shape's `group`, `shared_len` and `follows` say what its prompt shares, for the bench's prompts
and the planner's simulated token ids alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pdserve.bench.serve.workload_spec import (
    LengthDist,
    RequestShape,
    WorkloadError,
    count,
    expect,
    key_values,
    length_range,
)

REUSE_HELP = """\
  shared-prefix[:groups=4,system=512,in=64,out=64]
                                         SGLang's generated-shared-prefix: `groups` system
                                         prompts of `system` tokens, each request one of them
                                         (interleaved) and its own question of `in` tokens
  multi-turn[:turns=4,system=256,in=64,out=64,conversations=N]
                                         conversations behind one system prompt of `system`
                                         tokens: each turn the history (user messages and the
                                         model's answers) plus a new message of `in` tokens,
                                         sent once the previous answer is back; conversations
                                         open at rate x N / --num-prompts, and the requests
                                         spread over N conversations (default: --num-prompts
                                         / turns, rounded up)
  in= and out= take N or LOW-HIGH (uniform); system=0: none; both kinds send real text"""
SHARED_DEFAULTS = {"groups": "4", "system": "512", "in": "64", "out": "64"}
TURNS_DEFAULTS = {"turns": "4", "system": "256", "in": "64", "out": "64"}


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """`groups` shared prefixes of `system` tokens, a question of `question` tokens each."""

    spec: str
    groups: int
    system: int
    question: LengthDist
    answer: LengthDist
    text = True
    replays_timestamps = False

    def sample(self, n: int, seed: int) -> list[RequestShape]:
        rng = np.random.default_rng(seed)
        questions, answers = self.question.sample(rng, n), self.answer.sample(rng, n)
        groups = rng.permutation(np.arange(n) % self.groups)  # as even as n allows, interleaved
        return [
            RequestShape(self.system + max(1, int(q)), max(1, int(o)), int(g), self.system)
            for q, o, g in zip(questions, answers, groups)
        ]


@dataclass(frozen=True)
class MultiTurnWorkload:
    """Conversations of up to `turns` turns of a user message and an answer each."""

    spec: str
    turns: int
    system: int
    message: LengthDist
    answer: LengthDist
    conversations: int | None = None  # None: ceil(requests / turns)
    text = True
    replays_timestamps = False

    def sample(self, n: int, seed: int) -> list[RequestShape]:
        """Conversation by conversation, each turn's shape `follows` the one before it."""
        convs = self.conversations or math.ceil(n / self.turns)
        if convs * self.turns < n:
            raise WorkloadError(
                f"--workload {self.spec!r}: {convs} conversations of {self.turns} turns hold "
                f"{convs * self.turns} requests, not --num-prompts {n}: raise conversations= or "
                "turns=, or lower --num-prompts"
            )
        rng = np.random.default_rng(seed)
        messages, answers = self.message.sample(rng, n), self.answer.sample(rng, n)
        shapes: list[RequestShape] = []
        for c in range(convs):
            for turn in range(n // convs + (c < n % convs)):
                new, out = max(1, int(messages[len(shapes)])), max(1, int(answers[len(shapes)]))
                if turn == 0:
                    shapes.append(RequestShape(self.system + new, out, 0, self.system))
                    continue
                prev = shapes[-1]
                history = prev.input_len + prev.output_len
                shapes.append(RequestShape(history + new, out, 0, self.system, len(shapes) - 1))
        return shapes


def parse_shared_prefix(spec: str, rest: str) -> SharedPrefixWorkload:
    keys = _with_defaults(spec, rest, SHARED_DEFAULTS)
    return SharedPrefixWorkload(
        spec,
        count(spec, keys, "groups"),
        _tokens(spec, keys, "system"),
        length_range(spec, keys, "in"),
        length_range(spec, keys, "out"),
    )


def parse_multi_turn(spec: str, rest: str) -> MultiTurnWorkload:
    keys = _with_defaults(spec, rest, TURNS_DEFAULTS, optional=("conversations",))
    convs = count(spec, keys, "conversations") if "conversations" in keys else None
    return MultiTurnWorkload(
        spec,
        count(spec, keys, "turns"),
        _tokens(spec, keys, "system"),
        length_range(spec, keys, "in"),
        length_range(spec, keys, "out"),
        convs,
    )


def _with_defaults(
    spec: str, rest: str, defaults: dict[str, str], optional: tuple[str, ...] = ()
) -> dict[str, str]:
    given = key_values(spec, rest) if rest.strip() else {}
    expect(spec, given, required=(), optional=(*defaults, *optional))
    return {**defaults, **given}


def _tokens(spec: str, keys: dict[str, str], key: str) -> int:
    """A token count that may be 0 (no system prompt)."""
    return 0 if keys[key] == "0" else count(spec, keys, key)


def context_problem(shapes: list[RequestShape], max_model_len: int) -> str | None:
    """Why these reuse shapes do not fit the model's context (cutting a prompt would break what
    it shares), or None."""
    worst = max(shapes, key=lambda s: s.input_len + s.output_len, default=None)
    if worst is None or worst.input_len + worst.output_len <= max_model_len:
        return None
    return (
        f"a request of {worst.input_len} prompt + {worst.output_len} output tokens exceeds the "
        f"model's context of {max_model_len} tokens: lower system=, in=, out= or turns="
    )
