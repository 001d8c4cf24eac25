"""Turn a batch of logits into next tokens: penalties, temperature, top-k/top-p/min-p, draws.

Order per row: penalties -> greedy argmax if temperature == 0 -> temperature -> top-k -> top-p
-> min-p -> sample. Each step is one batched tensor op driven by per-row parameter tensors; the
only per-row Python work is drawing the noise of seeded rows.

Sampling is an exponential race: token = argmax(probs / q) with q ~ Exp(1) i.i.d., which picks
token i with probability probs[i]. A seeded row draws q from a CPU generator seeded with
(seed, tokens generated so far), so its token depends only on that pair and its own logits: the
same on the prefill worker (token 1) and on any decode worker (the rest), whatever the batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplerOutput, SamplingRow, TokenLogprobs

_MASK64 = (1 << 64) - 1


class Sampler:
    """Samples one token per row of a logits batch, following each row's SamplingParams."""

    def __init__(self) -> None:
        # Seeded noise is drawn on the CPU: CPU and CUDA generators give different streams, and
        # the two workers that sample one request may sit on different device types.
        self._generator = torch.Generator(device="cpu")

    def __call__(self, logits: Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        # logits: [B, V]
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        logits = logits.float()
        if all(_is_plain_greedy(r.params) for r in rows):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(rows))

        wants_logprobs = any(r.params.logprobs is not None for r in rows)
        # vLLM v1's default: logprobs of the model's distribution, before any processing.
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        logits = apply_penalties(logits, rows)

        token_ids = logits.argmax(dim=-1)  # [B]: the answer for greedy rows
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            token_ids[index] = self._sample(logits[index], [rows[i] for i in sampled])

        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, token_ids, rows)
        return SamplerOutput(token_ids.tolist(), logprobs)

    def _sample(self, logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
        # logits: [S, V] for the non-greedy rows only
        device = logits.device
        temperature = torch.tensor([r.params.temperature for r in rows], device=device)
        temperature = temperature.clamp(min=1e-5)  # smaller ones would overflow; greedy anyway
        logits = logits / temperature[:, None]
        logits = apply_top_k_top_p(logits, rows)
        logits = apply_min_p(logits, rows)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs).exponential_()  # [S, V]; default RNG for unseeded rows
        for i, row in enumerate(rows):
            if row.params.seed is not None:
                noise[i] = self._seeded_noise(row, probs.shape[1]).to(device)
        # A zero draw would turn a filtered token's 0 / 0 into NaN, which argmax would pick.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)

    def _seeded_noise(self, row: SamplingRow, vocab_size: int) -> Tensor:
        assert row.params.seed is not None
        self._generator.manual_seed(step_seed(row.params.seed, len(row.output_token_ids)))
        return torch.empty(vocab_size).exponential_(generator=self._generator)


def _is_plain_greedy(params: SamplingParams) -> bool:
    return params.greedy and params.logprobs is None and not _has_penalties(params)


def _has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """Generator seed for a seeded request's draw number `step` (0 for the first token).

    Plain integer arithmetic, never hash(): every process must derive the same value.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 1  # 63 bits: any torch accepts it


def token_counts(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> Tensor:
    """counts[b, t] = how often token t occurs in token_lists[b]. Returns [B, V] float32."""
    lengths = torch.tensor([len(ids) for ids in token_lists], device=device)
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    counts = torch.zeros(len(token_lists), vocab_size, device=device)
    counts.index_put_(
        (rows, flat.to(device)), torch.ones_like(rows, dtype=counts.dtype), accumulate=True
    )
    return counts


def apply_penalties(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """Repetition penalty over prompt + output tokens (HF/vLLM: divide positive logits, multiply
    negative ones); presence and frequency penalties over output tokens (OpenAI). Returns a new
    tensor when any row has a penalty, else logits itself."""
    # logits: [B, V]
    if not any(_has_penalties(r.params) for r in rows):
        return logits
    vocab = logits.shape[1]
    device = logits.device
    repetition = torch.tensor([r.params.repetition_penalty for r in rows], device=device)[:, None]
    if bool((repetition != 1.0).any()):
        # Rows without the penalty contribute no tokens: their mask stays empty.
        seen_ids = [
            [*r.prompt_token_ids, *r.output_token_ids] if r.params.repetition_penalty != 1.0 else []
            for r in rows
        ]
        seen = token_counts(seen_ids, vocab, device) > 0
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalised, logits)
    presence = torch.tensor([r.params.presence_penalty for r in rows], device=device)[:, None]
    frequency = torch.tensor([r.params.frequency_penalty for r in rows], device=device)[:, None]
    if bool((presence != 0.0).any() or (frequency != 0.0).any()):
        counts = token_counts([r.output_token_ids for r in rows], vocab, device)
        logits = logits - frequency * counts - presence * (counts > 0).float()
    return logits


def apply_top_k_top_p(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """Set logits outside each row's top-k, then outside its top-p nucleus, to -inf."""
    # logits: [B, V]
    vocab = logits.shape[1]
    device = logits.device
    top_k = [r.params.top_k if r.params.top_k > 0 else vocab for r in rows]
    top_p = [r.params.top_p for r in rows]
    use_k, use_p = any(k < vocab for k in top_k), any(p < 1.0 for p in top_p)
    if not (use_k or use_p):
        return logits
    # Ascending sort: the tokens to drop are a prefix of each sorted row.
    sorted_logits, order = logits.sort(dim=-1)  # [B, V] each
    if use_k:
        k = torch.tensor(top_k, device=device).clamp(max=vocab)
        kth_largest = sorted_logits.gather(1, (vocab - k)[:, None])  # [B, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, -torch.inf)
    if use_p:
        p = torch.tensor(top_p, device=device)[:, None]
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - p  # the least likely tokens holding at most 1 - p of the mass
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """Set logits of tokens less likely than min_p times the row's top probability to -inf."""
    # logits: [B, V]
    min_p = [r.params.min_p for r in rows]
    if not any(m > 0.0 for m in min_p):
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = torch.tensor(min_p, device=logits.device)[:, None] * probs.amax(
        dim=-1, keepdim=True
    )
    return logits.masked_fill(probs < threshold, -torch.inf)


def gather_logprobs(
    raw_logprobs: Tensor, token_ids: Tensor, rows: Sequence[SamplingRow]
) -> list[TokenLogprobs | None]:
    """The sampled token's logprob and the top-n, for rows that asked (params.logprobs = n)."""
    # raw_logprobs: [B, V]; token_ids: [B]
    chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
    max_n = max(r.params.logprobs or 0 for r in rows)
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if max_n > 0:
        values, ids = raw_logprobs.topk(max_n, dim=-1)  # sorted, best first
        top_values, top_ids = values.tolist(), ids.tolist()
    result: list[TokenLogprobs | None] = []
    for b, (row, token_id) in enumerate(zip(rows, token_ids.tolist(), strict=True)):
        n = row.params.logprobs
        if n is None:
            result.append(None)
            continue
        top = list(zip(top_ids[b][:n], top_values[b][:n], strict=True))
        result.append(TokenLogprobs(token_id, chosen[b], top))
    return result
