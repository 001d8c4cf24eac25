"""Perplexity through the serving path: a text's tokens run through `CausalLM` in chunks over a
paged KV cache of the setting's KV dtype, so a compressed cache's rounding shows in the score.

Strided evaluation (transformers' perplexity guide): windows of ``window`` tokens every
``stride`` tokens; each window scores the tokens no earlier window scored, predicting each from
up to ``window - 1`` tokens of context. Inside a window the tokens go in chunks of ``chunk``: the
first chunk attends over its own fresh K/V, every later one over the gathered cache blocks (its
own included), which is where the KV dtype acts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.attention import MixedMetadata
from pdserve.engine.model import CausalLM

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Perplexity:
    tokens: int  # tokens scored
    nll: float  # their summed negative log-likelihood (nats)
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))


@torch.inference_mode()
def perplexity(
    model: CausalLM,
    cache: torch.Tensor,
    ids: list[int],
    window: int = 1024,
    stride: int = 512,
    chunk: int = 64,
) -> Perplexity:
    """Perplexity of ``ids`` (see the module docstring); ``cache`` holds at least a window."""
    if not 0 < stride <= window or len(ids) < 2:
        raise ValueError(f"need 0 < stride <= window and 2+ tokens (stride {stride}, {window})")
    start = time.perf_counter()
    nll, scored, done = 0.0, 0, 0  # done: tokens already predicted (positions 1..done)
    for begin in range(0, len(ids) - 1, stride):
        seq = ids[begin : begin + window]
        first_target = max(done - begin, 0) + 1  # the first position not scored yet, >= 1
        logits = _window_logits(model, cache, seq)
        targets = torch.tensor(seq[first_target:], device=logits.device)
        logprobs = F.log_softmax(logits[first_target - 1 : len(seq) - 1], dim=-1)
        nll -= float(logprobs.gather(1, targets[:, None]).sum())
        scored += len(targets)
        done = begin + len(seq) - 1
        if begin + window >= len(ids):
            break
    return Perplexity(scored, nll, time.perf_counter() - start)


def _window_logits(
    model: CausalLM, cache: torch.Tensor, seq: list[int], chunk: int = 64
) -> torch.Tensor:
    """logits [len(seq), vocab] of one sequence run chunk by chunk over the paged cache."""
    device = cache.device
    table = list(range(-(-len(seq) // BLOCK_SIZE)))  # block i holds positions [16 i, 16 i + 16)
    out = []
    for lo in range(0, len(seq), chunk):
        hi = min(lo + chunk, len(seq))
        meta = MixedMetadata(
            decode=None,
            chunk_starts=[lo],
            chunk_lens=[hi - lo],
            chunk_tables=[table],
            chunk_slots=torch.arange(lo, hi, device=device),  # slot = position (table above)
        )
        ids = torch.tensor(seq[lo:hi], device=device)
        hidden = model(ids, torch.arange(lo, hi, device=device), meta, cache)
        out.append(model.compute_logits(hidden))
    return torch.cat(out)
