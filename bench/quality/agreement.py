"""Greedy agreement: how much of a setting's greedy answer to each chat prompt is the float32
answer, token for token, through the decode engine (local prefill into the paged cache, then
decode steps), so weight and KV-cache quantization both act as they do when serving."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.decode_worker.engine import DecodeEngine
from pdserve.engine.request import DecodeRequest
from pdserve.engine.sampling_params import SamplingParams

# 20 chat prompts of the kinds people send a small instruct model: facts, lists, short writing,
# explanations, a little code and arithmetic.
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "In one sentence, why is the sky blue?",
    "List the planets of the solar system in order from the sun.",
    "What is 12 times 7?",
    "Give me a synonym for 'happy'.",
    "Explain what a neural network is to a ten-year-old.",
    "Write a Python function that returns the square of a number.",
    "What is the boiling point of water in Fahrenheit?",
    "Suggest a name for a friendly golden retriever.",
    "Translate 'good morning' into Spanish.",
    "What are the three states of matter?",
    "Write a short thank-you note to a teacher.",
    "Who wrote Romeo and Juliet?",
    "How many days are there in a leap year?",
    "Describe a rainy day in two sentences.",
    "What does the acronym CPU stand for?",
    "Give one tip for getting better sleep.",
    "What is the largest ocean on Earth?",
)


@dataclass(frozen=True)
class Agreement:
    prompts: int
    identical: int  # answers equal to float32's in every token
    agreed_tokens: int  # tokens before each answer's first difference, summed
    reference_tokens: int  # float32's tokens, summed

    @property
    def token_share(self) -> float:
        return self.agreed_tokens / max(self.reference_tokens, 1)


def greedy_answers(
    engine: DecodeEngine, prompts: Sequence[list[int]], max_tokens: int
) -> list[list[int]]:
    """Each prompt's greedy answer (stopping at the model's end of turn or ``max_tokens``)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    answers: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        req = DecodeRequest(i, f"agree-{i}", tuple(prompt), params, local_prefill=True)
        if engine.reserve(req) is None:
            raise RuntimeError("the agreement engine's cache is too small for its prompts")
        answers[i] = []
    while engine.has_work:
        for tid, delta in engine.step():
            if delta.error:
                raise RuntimeError(f"prompt {tid} failed: {delta.error}")
            answers[tid] += delta.token_ids
    return [answers[i] for i in range(len(prompts))]


def agreement(reference: Sequence[list[int]], answers: Sequence[list[int]]) -> Agreement:
    agreed = sum(_common_prefix(r, a) for r, a in zip(reference, answers, strict=True))
    return Agreement(
        len(reference),
        sum(r == a for r, a in zip(reference, answers, strict=True)),
        agreed,
        sum(len(r) for r in reference),
    )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_prompt_ids(render: Callable[[list[dict[str, str]]], list[int]]) -> list[list[int]]:
    """``CHAT_PROMPTS`` rendered by ``render`` (the tokenizer's chat template)."""
    return [render([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
