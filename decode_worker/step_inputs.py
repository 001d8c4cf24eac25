"""The runner's inputs for a planned decode engine step (`DecodeEngine.prepare`): the recomputes
and prompt chunks to run, and the sampling rows that draw the step's tokens. Pure functions over
the plan, the block tables and the held requests; the types they build are ``step.py``'s."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from pdserve.decode_worker.seq import DecodeSeq
from pdserve.decode_worker.step import ChunkInput, EngineStep, HeldRequest, StepBatch
from pdserve.engine.request import DecodeRequest, replay_row
from pdserve.engine.sampling_types import SamplingRow


def step_batch(
    step: EngineStep, table: Callable[[int], Sequence[int]], held: Mapping[int, HeldRequest]
) -> StepBatch:
    """The runner's inputs: recomputes, then prompt chunks; rows for the decode seqs, then
    for the prompts whose last chunk runs. ``table(seq_id)``: the seq's block table."""
    # recompute: rebuild the cache of all but the last token, which the next step decodes
    # (from its first block that is not a prefix-cache hit)
    starts = [step.out.recompute_start(s) for s in step.out.recompute]
    chunks = [
        ChunkInput(s.token_ids[start:-1], start, table(s.seq_id), False)
        for s, start in zip(step.out.recompute, starts)
    ]
    rows = [
        r
        for s in step.out.decode
        for r in decode_rows(held[s.seq_id].req, s, step.drafts.get(s.seq_id, ()))
    ]
    for c in step.chunks:
        req = held[c.seq_id].req
        prompt = req.prompt_token_ids
        chunks.append(ChunkInput(prompt[c.start : c.end], c.start, table(c.seq_id), c.last))
        if c.last:
            rows.append(replay_row(req.sampling, prompt, req.num_replayed))
    tables = [table(s.seq_id) for s in step.out.decode]
    drafts = [step.drafts.get(s.seq_id, []) for s in step.out.decode] if step.drafts else []
    return StepBatch(step.out.decode, tables, chunks, rows, drafts)


def decode_rows(req: DecodeRequest, seq: DecodeSeq, drafts: Sequence[int]) -> list[SamplingRow]:
    """A decode seq's sampling rows, one per position it computes: row i draws the token
    after drafts[:i], so its outputs include them (penalties, min_tokens and a seeded draw
    see what non-speculative decoding would). A migrated request's replayed tokens are
    outputs too."""
    cut = seq.prompt_len - req.num_replayed
    prompt, outputs = seq.token_ids[:cut], seq.token_ids[cut:]
    return [
        SamplingRow(req.sampling, prompt, [*outputs, *drafts[:i]]) for i in range(len(drafts) + 1)
    ]
