"""The types of one decode engine step: the plan, the runner's inputs, the runner's contract,
the limits an engine is built with, and what it holds per request. Plain data, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.decode_worker.prefill_queue import PrefillChunk
from pdserve.decode_worker.seq import DecodeSeq, ScheduleOutput
from pdserve.engine.request import DecodeRequest, StepDelta
from pdserve.engine.sampling_types import SamplerOutput, SamplingRow, TokenLogprobs
from pdserve.engine.speculative import SpeculativeSettings

Output = tuple[int, StepDelta]  # (transfer id, what its stream gets)


@dataclass(frozen=True)
class ChunkInput:
    """Positions [start, start + len(token_ids)) of one sequence to run through the model."""

    token_ids: Sequence[int]
    start: int
    table: Sequence[int]  # the sequence's block table
    sample: bool  # sample the next token from the chunk's last position (a prompt's last chunk)


@dataclass(frozen=True)
class StepBatch:
    """What the runner computes in one forward: a decode token (and its drafts) for each of
    ``seqs``, then the ``chunks``; ``rows`` sample the seqs' next tokens (one per decode token
    and draft), then those of the chunks with ``sample`` set, in that order."""

    seqs: Sequence[DecodeSeq]
    tables: Sequence[Sequence[int]]  # the seqs' block tables
    chunks: Sequence[ChunkInput]
    rows: Sequence[SamplingRow]
    # speculative decoding: per seq, the draft tokens it verifies after its decode token (its
    # rows: one per position, 1 + len(drafts)); () when no seq has any
    drafts: Sequence[Sequence[int]] = ()


class StepRunner(Protocol):
    """The data plane: runs one step's forward over the paged KV cache."""

    def run(self, batch: StepBatch) -> SamplerOutput | None:
        """Sampled tokens for ``batch.rows`` (None when there are none)."""


@dataclass
class EngineStep:
    """One step's plan: the decode scheduler's batch and the local prefill chunks."""

    out: ScheduleOutput
    chunks: list[PrefillChunk]
    drafts: dict[int, list[int]] = field(default_factory=dict)  # decode seq id -> its drafts

    @property
    def tids(self) -> set[int]:
        s = self.out
        return {q.seq_id for q in [*s.decode, *s.recompute]} | {c.seq_id for c in self.chunks}


@dataclass(frozen=True)
class EngineLimits:
    """What the engine must know of the model and its cache."""

    num_blocks: int
    block_size: int
    max_model_len: int
    num_kv_heads: int
    eos_token_ids: tuple[int, ...] = ()
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192  # colocated: tokens of one step (see LocalPrefillQueue)
    chunked_prefill: bool = False
    # share cached full blocks between requests (config.prefix_caching); their hashes chain
    # from prefix_salt (engine.prefix_hash.hash_salt of the model, KV format and block size)
    prefix_caching: bool = False
    prefix_salt: int = 0
    block_bytes: int = 0  # one block's KV over every layer and head (the reused-bytes metric)
    speculative: SpeculativeSettings | None = None  # decode.speculative; None: off


@dataclass
class HeldRequest:
    """A request a decode engine holds, from its reservation until it is dropped."""

    req: DecodeRequest
    heads: int = 0  # KV heads landed so far (summed over the prefill ranks' slices)
    first_token: int | None = None
    first_logprobs: TokenLogprobs | None = None  # colocated: from the local prefill
    kv_bytes: int = 0
    transfer_s: float = 0.0
    aborted: bool = False  # abort asked while KV is in flight: drop once it has landed
    running: bool = False  # activated in the scheduler
    cached_blocks: int = 0  # leading prompt blocks found in the prefix cache (no KV comes)
    hashes: list[int] = field(default_factory=list)  # the prompt's full blocks' chained hashes
    kv_at: float = 0.0  # lease clock: when it was reserved, then when its last KV part landed
