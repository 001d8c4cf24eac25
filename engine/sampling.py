"""Turn a batch of logits into next tokens: penalties, temperature, top-k/top-p/min-p, draws.

Order per row: logit_bias and the min_tokens mask (as vLLM v1's logits processors) -> penalties
-> greedy argmax if temperature == 0 -> temperature -> top-k -> top-p
-> min-p -> sample. Penalties are batched tensor ops driven by per-row parameter tensors; the
filters and the draw are in `sampling_draw`, which samples exactly from the processed
distribution without sorting the vocabulary.

Each sampled row gets its uniforms (a few, one per draw: inverse-CDF draws, see
`sampling_draw`) from a CPU generator. A seeded row's generator is seeded with (seed, tokens
generated so far), so its token depends only on that pair and its own logits: the same on the
prefill worker (token 1) and on any decode worker (the rest), whatever the batch and whatever
the device. Unseeded rows draw from the sampler's own generator, seeded once from the OS
(or from `Sampler(seed=...)`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from pdserve.engine.sampling_draw import DRAWS, sample
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplerOutput, SamplingRow, TokenLogprobs

_MASK64 = (1 << 64) - 1


class Sampler:
    """Samples one token per row of a logits batch, following each row's SamplingParams."""

    def __init__(self, seed: int | None = None) -> None:
        # Noise is drawn on the CPU: CPU and CUDA generators give different streams, and the
        # two workers that sample one request may sit on different device types.
        self._seeded = torch.Generator(device="cpu")  # reseeded for every seeded row
        self._unseeded = torch.Generator(device="cpu")
        if seed is None:
            self._unseeded.seed()  # every process its own stream
        else:
            self._unseeded.manual_seed(seed)

    def __call__(self, logits: Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        # logits: [B, V]
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        logits = logits.float()
        if all(_is_plain_greedy(r.params) for r in rows):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(rows))

        wants_logprobs = any(r.params.logprobs is not None for r in rows)
        # vLLM v1's default: logprobs of the model's distribution, before any processing.
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        logits = apply_penalties(apply_logits_processors(logits, rows), rows)

        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(sampled) == len(rows):  # an argmax of [B, V] costs about one draw: skip it
            token_ids = self._sample(logits, rows)
        else:
            token_ids = logits.argmax(dim=-1)  # [B]: the answer for greedy rows
        if 0 < len(sampled) < len(rows):
            index = torch.tensor(sampled, device=logits.device)
            token_ids[index] = self._sample(logits[index], [rows[i] for i in sampled])

        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, token_ids, rows)
        return SamplerOutput(token_ids.tolist(), logprobs)

    def _sample(self, logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
        # logits: [S, V] for the non-greedy rows only
        uniforms = self._uniforms(rows).to(logits.device)  # [S, DRAWS]
        return sample(logits, [r.params for r in rows], uniforms)

    def _uniforms(self, rows: Sequence[SamplingRow]) -> Tensor:
        uniforms = torch.rand(len(rows), DRAWS, generator=self._unseeded)
        for i, row in enumerate(rows):
            if row.params.seed is not None:
                self._seeded.manual_seed(step_seed(row.params.seed, len(row.output_token_ids)))
                uniforms[i] = torch.rand(DRAWS, generator=self._seeded)
        return uniforms


def _is_plain_greedy(params: SamplingParams) -> bool:
    return (
        params.greedy
        and params.logprobs is None
        and not _has_penalties(params)
        and not params.logit_bias
        and not params.min_tokens
    )


def apply_logits_processors(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """logit_bias added; while a row has fewer than min_tokens outputs, its EOS and stop token
    ids set to -inf. Ids outside the logits are skipped (the server checks them against the
    vocabulary first). Returns a new tensor when any row asks, else logits itself."""
    # logits: [B, V]
    vocab = logits.shape[1]
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_values: list[float] = []
    mask_rows: list[int] = []
    mask_ids: list[int] = []
    for b, row in enumerate(rows):
        p = row.params
        for token, value in p.logit_bias:
            if token < vocab:
                bias_rows.append(b)
                bias_ids.append(token)
                bias_values.append(value)
        if len(row.output_token_ids) < p.min_tokens:
            held = {*p.stop_token_ids, *([] if p.ignore_eos else p.eos_token_ids)}
            mask_ids += [t for t in held if t < vocab]
            mask_rows += [b] * (len(mask_ids) - len(mask_rows))
    if not bias_rows and not mask_rows:
        return logits
    logits = logits.clone()
    device = logits.device
    if bias_rows:
        index = (torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device))
        logits.index_put_(index, torch.tensor(bias_values, device=device), accumulate=True)
    if mask_rows:
        index = (torch.tensor(mask_rows, device=device), torch.tensor(mask_ids, device=device))
        logits[index] = float("-inf")
    return logits


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
