"""The plain types of a sampling step (no torch): what a row asks for and what was drawn.

Shared by the samplers, the workers, the router and the frontend; importing them never loads
torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence's share of a sampling step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated so far, excluding the token being sampled now


@dataclass
class TokenLogprobs:
    """Log-probabilities (of the raw logits) for one sampled token."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # top-n (token_id, logprob), best first


@dataclass
class SamplerOutput:
    """One sampled token per row, in row order."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None
