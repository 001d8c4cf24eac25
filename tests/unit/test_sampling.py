"""Sampler: greedy, penalties, filters, seeded reproducibility, logprobs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from pdserve.engine.sampling import Sampler, apply_penalties
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplingRow

PROBS = [0.5, 0.3, 0.15, 0.05]


def row(prompt: Sequence[int] = (), output: Sequence[int] = (), **params: Any) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output))


def draws(logits: Sequence[float], n: int, **params: Any) -> list[int]:
    """n independent samples of one distribution, drawn as one batch of n identical rows."""
    batch = torch.tensor([logits], dtype=torch.float32).repeat(n, 1)
    return Sampler(seed=0)(batch, [row(**params)] * n).token_ids


def frequencies(tokens: list[int], vocab: int) -> list[float]:
    return [tokens.count(t) / len(tokens) for t in range(vocab)]


@pytest.fixture(autouse=True)
def _fixed_rng() -> None:
    torch.manual_seed(1234)


def test_greedy_is_argmax_with_and_without_logprobs() -> None:
    logits = torch.randn(8, 50)
    expected = logits.argmax(-1).tolist()
    assert Sampler()(logits, [row(temperature=0.0)] * 8).token_ids == expected
    # logprobs take the general path; the answer must not change.
    assert Sampler()(logits, [row(temperature=0.0, logprobs=2)] * 8).token_ids == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_penalties(logits, [row(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0]], "input logits must not be modified"


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.zeros(1, 4)
    r = row(prompt=[0, 0, 3], output=[2, 2, 1], presence_penalty=0.5, frequency_penalty=0.25)
    # token 1 once: -(0.25 + 0.5); token 2 twice: -(2 * 0.25 + 0.5); prompt tokens untouched
    assert apply_penalties(logits, [r]).tolist() == [[0.0, -0.75, -1.0, 0.0]]


def test_penalties_apply_per_row_and_change_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0], [3.0, 2.0]])
    rows = [
        row(prompt=[0], temperature=0.0, repetition_penalty=2.0),
        row(prompt=[0], temperature=0.0),
    ]
    # 3.0 / 2 = 1.5 < 2.0 for the penalised row; its batch mate keeps the plain argmax
    assert Sampler()(logits, rows).token_ids == [1, 0]


def test_sampling_follows_the_distribution() -> None:
    tokens = draws(torch.tensor(PROBS).log().tolist(), 8000)
    for got, want in zip(frequencies(tokens, 4), PROBS, strict=True):
        assert got == pytest.approx(want, abs=0.03)


def test_temperature_sharpens_the_distribution() -> None:
    # temperature 0.5 squares the probabilities (then renormalises)
    squared = [p * p for p in PROBS]
    want = [p / sum(squared) for p in squared]
    tokens = draws(torch.tensor(PROBS).log().tolist(), 8000, temperature=0.5)
    for got, w in zip(frequencies(tokens, 4), want, strict=True):
        assert got == pytest.approx(w, abs=0.03)


def test_temperature_near_zero_is_greedy() -> None:
    logits = torch.randn(64, 100)
    sampled = Sampler(seed=0)(logits, [row(temperature=1e-4)] * 64).token_ids
    assert sampled == logits.argmax(-1).tolist()


def test_top_k_never_samples_outside_the_k_best() -> None:
    logits = torch.randn(30).tolist()
    best3 = set(torch.tensor(logits).topk(3).indices.tolist())
    tokens = draws(logits, 3000, temperature=5.0, top_k=3)
    assert set(tokens) == best3


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    tokens = draws(torch.tensor(PROBS).log().tolist(), 3000, top_p=0.75)
    assert set(tokens) == {0, 1}  # 0.5 + 0.3 >= 0.75; 0.5 alone is not


def test_min_p_drops_tokens_below_the_scaled_top_probability() -> None:
    tokens = draws(torch.tensor(PROBS).log().tolist(), 3000, min_p=0.2)
    assert set(tokens) == {0, 1, 2}  # 0.05 < 0.2 * 0.5


def test_filters_are_per_row_in_one_batch() -> None:
    logits = torch.tensor([PROBS] * 400).log()
    rows = [row(top_k=1) if i % 2 == 0 else row() for i in range(400)]
    tokens = Sampler(seed=0)(logits, rows).token_ids
    assert set(tokens[0::2]) == {0}
    assert len(set(tokens[1::2])) == 4


@pytest.mark.parametrize(
    "filters",
    [{}, {"top_p": 0.9}, {"top_k": 50, "temperature": 0.7}, {"min_p": 0.05, "top_p": 0.95}],
    ids=["plain", "top-p", "top-k", "min-p"],
)
def test_seeded_sample_ignores_batch_mates_position_and_global_rng(filters: dict) -> None:
    target_logits = torch.randn(1000) * 0.5  # flat enough that a draw varies with the noise
    target = row(prompt=[1, 2], output=[5, 6, 7], seed=42, **filters)
    alone = Sampler()(target_logits[None], [target]).token_ids[0]
    for seed in range(5):
        torch.manual_seed(seed)
        mates = torch.randn(4, 1000)
        batch = torch.cat([mates[:2], target_logits[None], mates[2:]])
        rows = [
            row(),
            row(seed=7, top_k=5),  # another parameter group: the target's rows are gathered
            target,
            row(temperature=0.0, repetition_penalty=1.5),
            row(top_p=0.5, min_p=0.1),
        ]
        assert Sampler()(batch, rows).token_ids[2] == alone


_OTHER_PROCESS = """
import torch
from pdserve.engine.sampling import Sampler
from pdserve.engine.sampling_types import SamplingRow
from pdserve.engine.sampling_params import SamplingParams
logits = torch.load({path!r})
rows = [SamplingRow(SamplingParams(seed=42), [1, 2], [5, 6, 7])]
print(Sampler()(logits, rows).token_ids[0])
"""


def test_seeded_sample_is_the_same_in_another_process(tmp_path: Path) -> None:
    # The first token is sampled on the prefill worker, the rest on a decode worker.
    logits = torch.randn(1, 1000) * 0.1
    torch.save(logits, tmp_path / "logits.pt")
    here = Sampler()(logits, [row(prompt=[1, 2], output=[5, 6, 7], seed=42)]).token_ids[0]
    script = _OTHER_PROCESS.format(path=str(tmp_path / "logits.pt"))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert int(there) == here


def test_seeded_samples_vary_with_seed_and_step() -> None:
    logits = torch.randn(1, 1000) * 0.1
    by_seed = {Sampler()(logits, [row(seed=s)]).token_ids[0] for s in range(20)}
    by_step = {Sampler()(logits, [row(output=[3] * n, seed=1)]).token_ids[0] for n in range(20)}
    assert len(by_seed) > 10
    assert len(by_step) > 10


def test_logprobs_come_from_raw_logits_sorted_best_first() -> None:
    logits = torch.randn(3, 40)
    rows = [
        row(output=[0, 0], logprobs=5, temperature=0.7, repetition_penalty=1.3, top_k=10),
        row(logprobs=0),
        row(),
    ]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, -1)
    first = out.logprobs[0]
    assert first is not None and first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(raw[0, out.token_ids[0]].item(), abs=1e-5)
    want_ids = raw[0].topk(5).indices.tolist()
    assert [t for t, _ in first.top] == want_ids
    assert [lp for _, lp in first.top] == pytest.approx(raw[0, want_ids].tolist(), abs=1e-5)
    assert out.logprobs[1] is not None and out.logprobs[1].top == []
    assert out.logprobs[2] is None


def test_unseeded_rows_differ_between_samplers_whatever_the_global_rng() -> None:
    # Each worker process builds its own Sampler; restarting one must not replay its draws.
    logits = torch.zeros(64, 1000)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append(Sampler()(logits, [row()] * 64).token_ids)
    assert draws[0] != draws[1]
    assert (
        Sampler(seed=5)(logits, [row()] * 64).token_ids
        == Sampler(seed=5)(logits, [row()] * 64).token_ids
    )
