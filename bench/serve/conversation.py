"""Prompts that share prefixes, as the load generator sends them: a request's group prefix (a
system prompt) and, for a later turn of a conversation, the turns before it with the model's
actual answers, which exist only once those turns are back.

On /v1/chat/completions they are messages (system, user, assistant, ..., user); on
/v1/completions a transcript in which each turn's prompt is exactly the previous prompt, its
answer and the new message, so the server sees the same leading text again::

    SYSTEM\\n\\nUser: MESSAGE 1\\nAssistant:ANSWER 1\\n\\nUser: MESSAGE 2\\nAssistant:
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdserve.bench.serve.prompts import TextPrompts
from pdserve.bench.serve.workload_spec import RequestShape

if TYPE_CHECKING:  # load imports this module
    from pdserve.bench.serve.load import PlannedRequest

Turns = list[tuple[str, str]]  # (user message, answer), oldest first
EARLIER_TURN_FAILED = "not sent: an earlier turn of its conversation failed"


class Conversations:
    """A run's conversations: which answer each later turn waits for, and its history."""

    def __init__(self, requests: Sequence[PlannedRequest]) -> None:
        self._answered = {r.follows: asyncio.Event() for r in requests if r.follows is not None}
        self._turns: dict[int, Turns] = {}  # request index -> its conversation through it

    async def wait(self, req: PlannedRequest) -> bool:
        """Until the answer `req` follows is back (at once for a first turn); False when that
        turn failed (this one is not sent)."""
        if req.follows is None:
            return True
        await self._answered[req.follows].wait()
        return req.follows in self._turns

    def finished(self, req: PlannedRequest, answer: str | None) -> None:
        """`req` is back with `answer` (None: it failed); its next turn may go."""
        event = self._answered.get(req.index)
        if event is None:  # no turn follows it
            return
        if answer is not None:
            assert isinstance(req.prompt, str), "conversation turns are text"
            self._turns[req.index] = [*self.history(req), (req.prompt, answer)]
        event.set()

    def history(self, req: PlannedRequest) -> Turns:
        """The turns before `req`, with their answers."""
        return [] if req.follows is None else self._turns.get(req.follows, [])


def chat_messages(req: PlannedRequest, history: Turns) -> list[dict[str, str]]:
    assert isinstance(req.prompt, str), "chat prompts are planned as text"
    messages = [{"role": "system", "content": req.system}] if req.system else []
    for user, answer in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return [*messages, {"role": "user", "content": req.prompt}]


def completion_prompt(req: PlannedRequest, history: Turns) -> list[int] | str:
    """The prompt as planned, or with a system prompt or history, the transcript."""
    if not (req.system or history):
        return req.prompt
    parts = [req.system] if req.system else []
    parts += [f"User: {user}\nAssistant:{answer}" for user, answer in history]
    return "\n\n".join([*parts, f"User: {req.prompt}\nAssistant:"])


def reuse_texts(
    shapes: Sequence[RequestShape], texts: TextPrompts, seed: int
) -> list[tuple[str, str, int]]:
    """(system prompt, new message, planned prompt tokens) per shape: one prose passage per
    group, and a message of what each prompt adds to its shared prefix or history."""
    groups = sorted({s.group for s in shapes if s.group >= 0})
    lengths = {s.group: s.shared_len for s in shapes if s.group >= 0}
    systems = dict(zip(groups, texts.passages([lengths[g] for g in groups], seed + 1)))
    new = [_new_tokens(s, shapes) for s in shapes]
    messages = texts.make(new, seed, whole=False)
    return [(systems.get(s.group, ""), m.text, s.input_len) for s, m in zip(shapes, messages)]


def _new_tokens(shape: RequestShape, shapes: Sequence[RequestShape]) -> int:
    if shape.follows is None:
        return max(1, shape.input_len - shape.shared_len)
    prev = shapes[shape.follows]
    return max(1, shape.input_len - prev.input_len - prev.output_len)
