"""Draw one token per row from the processed distribution, without sorting the vocabulary.

The processed distribution of a row: softmax(logits / temperature), cut to its top-k tokens,
then to its top-p nucleus (the most likely tokens, in order, until their mass reaches top_p,
measured after the top-k cut), then to the tokens at least min_p times as likely as its most
likely one, renormalised. Every cut keeps a most-likely-first prefix, so the support is the
shortest of the three prefixes. Ties at a cut (equal logits) may be broken either way.

Every draw is by inverse CDF: one uniform u per draw, token = the first whose cumulative
weight exceeds u * total. Each row brings DRAWS uniforms (the caller draws them, so that a
seeded row's come from its own generator). Which path a row takes depends only on its own
parameters and logits, never on its batch mates:

- top-k rows (0 < k < V): torch.topk(k) holds the whole support; top-p and min-p are cut from
  the k sorted candidates and the draw is among them.
- other rows with top-p or min-p: rejection. Draw from the whole (tempered) vocabulary and
  accept token j if it is in the support: p_j >= min_p * p_max, and the mass of the tokens
  more likely than j is < top_p. Accepted draws follow the distribution restricted to the
  support, renormalised, i.e. exactly the processed one. A draw is accepted with probability
  equal to the support's mass (>= top_p), about 1.1 rounds at top_p 0.9, each one pass over the
  vocabulary, where a sort of 49k logits costs ~4 ms per row on a CPU core (the pass ~0.06 ms).
  A row still rejected after ROUNDS draws takes the sorted path with its last uniform: each
  draw is independent of the earlier ones, so this stays exact.
- rows with no filter: one draw over the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pdserve.engine.sampling_params import SamplingParams

ROUNDS = 16  # rejection draws before the sorted path; P(all rejected) <= (1 - top_p) ** 16
DRAWS = ROUNDS + 1  # uniforms per row: ROUNDS rejection draws, one for the sorted path


def sample(logits: Tensor, params: Sequence[SamplingParams], uniforms: Tensor) -> Tensor:
    """One token per row of logits [S, V] (penalties already applied; no greedy rows), drawn
    from the row's processed distribution with its uniforms [S, DRAWS]. Returns [S] long."""
    assert logits.shape[0] == len(params) == uniforms.shape[0], (logits.shape, len(params))
    vocab = logits.shape[1]
    device = logits.device
    # top_k >= V cuts nothing: those rows take the cheaper paths.
    top_ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    temperature = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    tokens = torch.empty(len(params), dtype=torch.long, device=device)
    for k in sorted(set(top_ks)):
        rows = [i for i, rk in enumerate(top_ks) if rk == k]
        index = torch.tensor(rows, device=device)
        lg, t, p, m, u = logits, temperature, top_p, min_p, uniforms
        if len(rows) < len(params):  # mixed parameters; usually one group, no copies
            lg, t, p, m, u = (x.index_select(0, index) for x in (lg, t, p, m, u))
        tokens[index] = draw_sorted(lg, t, p, m, u[:, 0], k) if k else draw_full(lg, t, p, m, u)
    return tokens


def draw_sorted(
    logits: Tensor, temperature: Tensor, top_p: Tensor, min_p: Tensor, u: Tensor, k: int = 0
) -> Tensor:
    """Exact draw from the k most likely tokens (all when k == 0) sorted, then cut by top-p and
    min-p. logits [S, V]; temperature, top_p, min_p, u [S]. Returns [S] long."""
    if 0 < k < logits.shape[1]:
        values, ids = logits.topk(k, dim=-1)  # [S, k], most likely first
    else:
        values, ids = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(values / temperature[:, None], dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely candidates
    keep = (before < top_p[:, None]) & (probs >= min_p[:, None] * probs[:, :1])
    chosen = inverse_cdf(probs * keep, u[:, None])  # [S, 1]
    return ids.gather(1, chosen).squeeze(1)


def draw_full(
    logits: Tensor,
    temperature: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    uniforms: Tensor,
    rounds: int = ROUNDS,
) -> Tensor:
    """Draws over the whole vocabulary, rejecting tokens outside the top-p / min-p support
    (module docstring). logits [S, V]; temperature, top_p, min_p [S]; uniforms [S, DRAWS]."""
    weights = logits - logits.amax(dim=-1, keepdim=True)
    if bool((temperature != 1.0).any()):
        weights.div_(temperature[:, None])
    weights.exp_()  # [S, V]: unnormalised probabilities, the most likely token weighs 1
    cdf = weights.cumsum(dim=-1)
    candidates = inverse_cdf(weights, uniforms[:, :rounds], cdf)  # [S, rounds]
    if rounds > 0 and not bool(((top_p < 1.0) | (min_p > 0.0)).any()):
        return candidates[:, 0]
    chosen = first_in_support(weights, cdf, candidates, top_p, min_p)
    result = torch.tensor(chosen, device=logits.device)
    rest = [i for i, c in enumerate(chosen) if c < 0]
    if rest:
        index = torch.tensor(rest, device=logits.device)
        result[index] = draw_sorted(
            logits[index], temperature[index], top_p[index], min_p[index], uniforms[index, -1]
        )
    return result


def first_in_support(
    weights: Tensor, cdf: Tensor, candidates: Tensor, top_p: Tensor, min_p: Tensor
) -> list[int]:
    """Per row, its first candidate inside the top-p / min-p support; -1 if none is.
    weights, cdf [S, V]; candidates [S, rounds]; top_p, min_p [S]."""
    # min-p needs no pass: p_j / p_max is the candidate's weight.
    in_min_p = (weights.gather(1, candidates) >= min_p[:, None]).tolist()  # [S][rounds]
    nucleus = (top_p * cdf[:, -1]).tolist()  # the mass a candidate's betters must stay below
    uses_top_p = (top_p < 1.0).tolist()
    tokens = candidates.tolist()
    chosen = [-1] * len(tokens)
    for r in range(candidates.shape[1]):
        todo = [i for i, c in enumerate(chosen) if c < 0 and in_min_p[i][r]]
        check = [i for i in todo if uses_top_p[i]]
        if check:
            betters = mass_above(weights, candidates[:, r], check)
            rejected = {i for i, m in zip(check, betters, strict=True) if m >= nucleus[i]}
            todo = [i for i in todo if i not in rejected]
        for i in todo:
            chosen[i] = tokens[i][r]
        if min(chosen) >= 0:
            break
    return chosen


def mass_above(weights: Tensor, tokens: Tensor, rows: list[int]) -> list[float]:
    """For each row i in rows: the total weight of the tokens heavier than tokens[i]."""
    own = weights.gather(1, tokens[:, None]).squeeze(1).tolist()  # [S]
    # threshold keeps x where x > own and writes 0 elsewhere: one pass, no bool mask (masks
    # and where() cost 2-4x more on CPU); one call per row, as its threshold is a scalar.
    masses = [F.threshold(weights[i], own[i], 0.0).sum() for i in rows]
    return torch.stack(masses).tolist()


def inverse_cdf(weights: Tensor, u: Tensor, cdf: Tensor | None = None) -> Tensor:
    """Index of the first cumulative weight above u * total, per row and uniform.
    weights [S, V] (>= 0, some > 0 per row); u [S, n] in [0, 1). Returns [S, n] long."""
    cdf = weights.cumsum(dim=-1) if cdf is None else cdf
    total = cdf[:, -1:]
    # strictly below the total, so the answer is a token of nonzero weight even when u * total
    # rounds up to it
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.contiguous(), right=True)
