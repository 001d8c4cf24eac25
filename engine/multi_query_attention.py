"""Decode with drafts: several queries per sequence (its decode token and the drafts it
verifies), each seeing the cache up to its own position, in one batched SDPA call.

A sequence i contributes q_i >= 1 consecutive tokens at positions ctx_i - q_i .. ctx_i - 1.
The batch is padded to Q = max q_i queries per sequence; padding rows repeat the sequence's
last query (so no row sees nothing, which would give NaN) and are dropped. Plain tensors in and
out: engine/decode_attention.py plans the step and gathers the blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draft_queries(
    context_lens: torch.Tensor, query_lens: list[int], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each padded query and where the real ones sit among the B * Q padded rows.

    context_lens: [B, 1] -> (query positions [B, Q], q_index [T]: row of packed token t)
    """
    dev = context_lens.device
    q_len = torch.tensor(query_lens, device=dev)[:, None]
    j = torch.arange(width, device=dev)
    # query j of a sequence sits at ctx - q_len + j; padding rows (j >= q_len) copy the last one
    query = context_lens - q_len + j.minimum(q_len - 1)  # [B, Q]
    q_index = (torch.arange(len(query_lens), device=dev)[:, None] * width + j)[j < q_len]
    return query, q_index


def split_by_query_len(query_lens: list[int]) -> list[tuple[list[int], list[int]]]:
    """The sequences with one query, then those with drafts: (their indices, their tokens'
    indices in the packed batch) for each, so one-query sequences are not padded to Q."""
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    parts = []
    for seqs in (
        [i for i, n in enumerate(query_lens) if n == 1],
        [i for i, n in enumerate(query_lens) if n > 1],
    ):
        parts.append((seqs, [t for i in seqs for t in range(starts[i], starts[i + 1])]))
    return parts


def multi_query_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    q_index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [T, heads, D] packed; k, v: [B, kv_heads, L, D] (each sequence's gathered blocks);
    visible: [B, 1, Q, L] bool -> [T, heads, D]"""
    batch, width = visible.shape[0], visible.shape[2]
    heads, head_dim = q.shape[1:]
    kv_heads = k.shape[1]
    group = heads // kv_heads
    padded = q.new_zeros(batch * width, heads, head_dim)
    padded[q_index] = q
    # GQA as a query length, as in plain decode: [B, kv_heads, Q * group, D], queries major
    grouped = (
        padded.view(batch, width, kv_heads, group, head_dim)
        .transpose(1, 2)
        .reshape(batch, kv_heads, width * group, head_dim)
    )
    mask = visible.repeat_interleave(group, dim=2)  # [B, 1, Q * group, L]
    o = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
    o = o.view(batch, kv_heads, width, group, head_dim).transpose(1, 2)
    return o.reshape(batch * width, heads, head_dim)[q_index]
