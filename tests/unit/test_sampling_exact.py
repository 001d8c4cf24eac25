"""The sampler draws exactly from the processed distribution, on every path: chi-square of many
draws (fixed seeds, so deterministic) against probabilities computed here from the definition
(temperature, then sort, cut to top-k, top-p, min-p, renormalise)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch

from pdserve.engine.sampling import Sampler
from pdserve.engine.sampling_draw import DRAWS, draw_full
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplingRow

# Distinct probabilities, placed out of rank order so vocabulary order != likelihood order.
PROBS = [0.22, 0.18, 0.14, 0.11, 0.09, 0.07, 0.06, 0.05, 0.04, 0.02, 0.015, 0.005]
PLACES = [7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 4, 6]
LOGITS = [0.0] * len(PROBS)
for _place, _p in zip(PLACES, PROBS, strict=True):
    LOGITS[_place] = math.log(_p)
DRAW_COUNT = 12_000

CASES: dict[str, dict[str, Any]] = {
    "temperature 0.5": {"temperature": 0.5},
    "temperature 2": {"temperature": 2.0},
    "top-k": {"temperature": 1.5, "top_k": 3},
    "top-p": {"top_p": 0.6},
    "min-p": {"min_p": 0.3},
    "top-p and min-p": {"temperature": 1.3, "top_p": 0.7, "min_p": 0.25},
    "all filters": {"temperature": 0.8, "top_k": 6, "top_p": 0.7, "min_p": 0.2},
    "rare acceptance": {"temperature": 3.0, "top_p": 0.15},  # many rows reach the sorted path
}


def reference(
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> list[float]:
    """The processed distribution by its definition, in plain Python."""
    weights = [math.exp(x / temperature) for x in LOGITS]
    order = sorted(range(len(weights)), key=lambda t: -weights[t])
    kept = order[:top_k] if top_k > 0 else order
    total = sum(weights[t] for t in kept)
    nucleus: list[int] = []
    before = 0.0
    for t in kept:  # the most likely tokens until their mass reaches top_p
        if before >= top_p:
            break
        nucleus.append(t)
        before += weights[t] / total
    best = weights[order[0]]
    support = [t for t in nucleus if weights[t] >= min_p * best]
    mass = sum(weights[t] for t in support)
    return [weights[t] / mass if t in support else 0.0 for t in range(len(weights))]


def chi_square(tokens: list[int], probs: list[float]) -> float:
    counts = Counter(tokens)
    assert set(counts) <= {t for t, p in enumerate(probs) if p > 0}, "a token outside the support"
    n = len(tokens)
    return sum((counts[t] - n * p) ** 2 / (n * p) for t, p in enumerate(probs) if p > 0)


def critical(df: int) -> float:
    """Chi-square quantile at 1 - 1e-4 (Wilson-Hilferty; within ~1% for df >= 2)."""
    z = 3.719
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def check(tokens: list[int], want: list[float]) -> None:
    support = sum(p > 0 for p in want)
    if support == 1:
        assert set(tokens) == {want.index(1.0)}
        return
    assert chi_square(tokens, want) < critical(support - 1)
    # The same statistic rejects the unprocessed distribution: this test can fail.
    raw = [p / sum(PROBS) for p in reference()]
    if any(abs(a - b) > 0.02 for a, b in zip(raw, want, strict=True)):
        assert chi_square(tokens, raw) > critical(len(raw) - 1)


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_draws_follow_the_processed_distribution(name: str) -> None:
    params = SamplingParams(**CASES[name])
    batch = torch.tensor([LOGITS]).repeat(DRAW_COUNT, 1)
    tokens = Sampler(seed=1)(batch, [SamplingRow(params, [], [])] * DRAW_COUNT).token_ids
    check(tokens, reference(**CASES[name]))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if "top_k" not in c])
def test_the_sorted_fallback_draws_the_same_distribution(name: str) -> None:
    case = CASES[name]
    full = {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0} | case
    column = {k: torch.full((DRAW_COUNT,), float(v)) for k, v in full.items()}
    uniforms = torch.rand(DRAW_COUNT, DRAWS, generator=torch.Generator().manual_seed(2))
    batch = torch.tensor([LOGITS]).repeat(DRAW_COUNT, 1)
    # rounds=0: no rejection draw at all, every row takes the sorted path
    tokens = draw_full(batch, **column, uniforms=uniforms, rounds=0).tolist()
    check(tokens, reference(**case))


def test_top_p_on_a_real_size_vocabulary_stays_in_the_nucleus() -> None:
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(3)) * 3
    probs = torch.softmax(logits, -1)
    ranked = probs.sort(descending=True)
    size = int((ranked.values.cumsum(0) < 0.5).sum()) + 1
    nucleus = set(ranked.indices[:size].tolist())
    rows = [SamplingRow(SamplingParams(top_p=0.5), [], [])] * 64
    tokens = Sampler(seed=4)(logits[None].repeat(64, 1), rows).token_ids
    assert set(tokens) <= nucleus
    assert len(set(tokens)) > 20, f"a nucleus of {size} tokens, drawn 64 times"
