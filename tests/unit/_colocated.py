"""A colocated instance's step loop in process: what DecodeWorker does each step, without Ray.

DecodeScheduler + LocalPrefillQueue decide; a DecodeRunner computes (or, without one, every
sampled token is 7, for policy tests that need no model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.decode_worker.prefill_queue import LocalPrefillQueue, PrefillChunk
from pdserve.decode_worker.runner import ChunkInput, DecodeRunner
from pdserve.decode_worker.scheduler import DecodeScheduler, DecodeSeq, ScheduleOutput
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplingRow

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


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
        runner: DecodeRunner | None = None,
    ) -> None:
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = DecodeScheduler(
            self.blocks, max_num_seqs, max_model_len or num_blocks * block_size
        )
        self.prefills = LocalPrefillQueue(budget, max_num_seqs, chunked)
        self.runner = runner
        self.prompts: dict[int, list[int]] = {}
        self.max_tokens: dict[int, int] = {}
        self.outputs: dict[int, list[int]] = {}  # generated tokens, first one included
        self.preemptions = 0

    def submit(self, seq_id: int, prompt: list[int], max_tokens: int = 100) -> None:
        assert self.scheduler.reserve(seq_id, len(prompt)) is not None, "cache too small"
        self.prefills.add(seq_id, len(prompt))
        self.prompts[seq_id], self.max_tokens[seq_id] = prompt, max_tokens
        self.outputs[seq_id] = []

    def abort(self, seq_id: int) -> None:
        self.scheduler.abort(seq_id)
        self.prefills.remove(seq_id)

    @property
    def idle(self) -> bool:
        s = self.scheduler
        return not (len(self.prefills) or s.num_running or s.num_waiting or s.num_reserved)

    def step(self) -> StepRecord:
        if self.prefills.prefill_only:
            out, chunks = ScheduleOutput(), self.prefills.schedule(0)
        else:
            out = self.scheduler.schedule()
            chunks = self.prefills.schedule(out.num_tokens)
        self.preemptions += len(out.preempted)
        record = StepRecord(
            [s.seq_id for s in out.decode], [s.seq_id for s in out.recompute], chunks
        )
        tokens = self._compute(out, chunks)
        self.scheduler.on_step_done(out.decode)
        for seq, token in zip(out.decode, tokens, strict=False):
            seq.token_ids.append(token)
            self.outputs[seq.seq_id].append(token)
            if self.scheduler.reached_length_limit(seq):
                self.scheduler.finish(seq.seq_id)
        self.prefills.on_done(chunks)
        finished = [c for c in chunks if c.last]
        for c, token in zip(finished, tokens[len(out.decode) :], strict=True):
            self._land(c.seq_id, token)
            record.first_tokens.append(c.seq_id)
        self.scheduler.check_integrity()
        return record

    def run(self, max_steps: int = 10_000) -> list[StepRecord]:
        records = []
        while not self.idle:
            records.append(self.step())
            assert len(records) < max_steps, "the engine does not make progress"
        return records

    def _land(self, seq_id: int, token: int) -> None:
        prompt = self.prompts[seq_id]
        self.outputs[seq_id].append(token)
        seq = DecodeSeq(seq_id, len(prompt), self.max_tokens[seq_id], [*prompt, token])
        if self.scheduler.reached_length_limit(seq):
            self.scheduler.finish(seq_id)
        else:
            self.scheduler.activate(seq)

    def _compute(self, out: ScheduleOutput, chunks: list[PrefillChunk]) -> list[int]:
        num_sampled = len(out.decode) + sum(c.last for c in chunks)
        if self.runner is None:
            return [7] * num_sampled
        table = self.blocks.block_table
        inputs = [ChunkInput(s.token_ids[:-1], 0, table(s.seq_id), False) for s in out.recompute]
        rows = [
            SamplingRow(GREEDY, s.token_ids[: s.prompt_len], s.token_ids[s.prompt_len :])
            for s in out.decode
        ]
        for c in chunks:
            prompt = self.prompts[c.seq_id]
            inputs.append(ChunkInput(prompt[c.start : c.end], c.start, table(c.seq_id), c.last))
            if c.last:
                rows.append(SamplingRow(GREEDY, prompt, ()))
        tables = [table(s.seq_id) for s in out.decode]
        result = self.runner.run(out.decode, tables, inputs, rows)
        return [] if result is None else result.token_ids
