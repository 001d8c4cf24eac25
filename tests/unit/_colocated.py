"""A colocated instance in process: the production `DecodeEngine`, stepped by hand and recorded.

With a `DecodeRunner` the engine computes for real; without one every sampled token is 7 (a
fake runner for policy tests that need no model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.prefill_queue import PrefillChunk
from pdserve.decode_worker.step import EngineLimits, StepBatch, StepRunner
from pdserve.engine.request import DecodeRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplerOutput
from pdserve.engine.speculative import Proposer, SpeculativeSettings


class SevensRunner:
    """Samples 7 for every row: the step's decisions without a model."""

    def run(self, batch: StepBatch) -> SamplerOutput | None:
        n = len(batch.rows)
        return SamplerOutput([7] * n, [None] * n) if n else None


@dataclass
class StepRecord:
    decode: list[int]  # seq ids decoded
    recompute: list[int]
    chunks: list[PrefillChunk]
    first_tokens: list[int] = field(default_factory=list)  # seq ids whose prefill finished

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.num_tokens for c in self.chunks)


class ColocatedEngine:
    def __init__(
        self,
        *,
        budget: int,
        chunked: bool = True,
        num_blocks: int = 64,
        block_size: int = 4,
        max_num_seqs: int = 4,
        max_model_len: int = 0,
        runner: StepRunner | None = None,
        prefix_caching: bool = False,
        speculative: SpeculativeSettings | None = None,
        proposer: Proposer | None = None,
    ) -> None:
        limits = EngineLimits(
            num_blocks=num_blocks,
            block_size=block_size,
            max_model_len=max_model_len or num_blocks * block_size,
            num_kv_heads=1,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            chunked_prefill=chunked,
            prefix_caching=prefix_caching,
            speculative=speculative,
        )
        self.engine = DecodeEngine(runner or SevensRunner(), limits, proposer=proposer)
        e = self.engine
        self.blocks, self.prefills, self.scheduler = e.blocks, e.prefills, e.scheduler
        self.outputs: dict[int, list[int]] = {}  # generated tokens, first one included
        self.logprobs: dict[int, list[Any]] = {}  # their TokenLogprobs (None: not asked)

    @property
    def preemptions(self) -> int:
        return self.engine.num_preemptions

    def submit(
        self,
        seq_id: int,
        prompt: list[int],
        max_tokens: int = 100,
        params: SamplingParams | None = None,
    ) -> None:
        if params is None:
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
        req = DecodeRequest(seq_id, str(seq_id), tuple(prompt), params, local_prefill=True)
        assert self.engine.reserve(req) is not None, "cache too small"
        self.outputs[seq_id] = []

    def abort(self, seq_id: int) -> None:
        self.engine.abort(seq_id, kv_pending=False)

    @property
    def idle(self) -> bool:
        return self.engine.num_requests == 0

    def step(self) -> StepRecord:
        step = self.engine.plan()
        assert step is not None, "nothing to run"
        out = step.out
        record = StepRecord(
            [s.seq_id for s in out.decode],
            [s.seq_id for s in out.recompute],
            list(step.chunks),
            [c.seq_id for c in step.chunks if c.last],
        )
        runner = self.engine.runner
        assert runner is not None
        for tid, delta in self.engine.commit(step, runner.run(self.engine.prepare(step))):
            assert delta.error is None, delta.error
            self.outputs[tid] += delta.token_ids
            self.logprobs.setdefault(tid, []).extend(delta.logprobs)
        self.engine.check_integrity()
        return record

    def run(self, max_steps: int = 10_000) -> list[StepRecord]:
        records = []
        while not self.idle:
            records.append(self.step())
            assert len(records) < max_steps, "the engine does not make progress"
        return records
