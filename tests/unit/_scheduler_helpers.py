"""Small factories for the decode scheduler's tests (vLLM's create_scheduler style)."""

from __future__ import annotations

from pdserve.decode_worker.scheduler import (
    DecodeScheduler,
    DecodeSeq,
    ScheduleOutput,
)
from pdserve.engine.block_manager import BlockManager


def create_scheduler(
    num_blocks: int = 8, block_size: int = 4, max_num_seqs: int = 4, max_model_len: int = 0
) -> DecodeScheduler:
    blocks = BlockManager(num_blocks, block_size)
    return DecodeScheduler(blocks, max_num_seqs, max_model_len or num_blocks * block_size)


def create_seq(seq_id: int, prompt_len: int, max_tokens: int = 100) -> DecodeSeq:
    # prompt + the first token sampled by prefill
    return DecodeSeq(seq_id, prompt_len, max_tokens, token_ids=list(range(prompt_len + 1)))


def admit(sched: DecodeScheduler, seq_id: int, prompt_len: int, max_tokens: int = 100) -> DecodeSeq:
    """Reserve, 'transfer' and activate one seq, as router + worker do."""
    assert sched.reserve(seq_id, prompt_len) is not None
    seq = create_seq(seq_id, prompt_len, max_tokens)
    sched.activate(seq)
    return seq


def step(sched: DecodeScheduler) -> ScheduleOutput:
    """One worker step: schedule, sample a token for each decode seq, report it, finish at limits."""
    out = sched.schedule()
    for seq in out.decode:
        seq.token_ids.append(7)
    sched.on_step_done(out.decode)
    for seq in out.decode:
        if sched.reached_length_limit(seq):
            sched.finish(seq.seq_id)
    sched.check_integrity()
    return out


def ids(seqs: list[DecodeSeq]) -> list[int]:
    return [seq.seq_id for seq in seqs]
