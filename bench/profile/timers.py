"""Timed engine calls for `pdserve profile`, in this process, on the real engine code.

- prefill: `DecodeRunner.run` over whole prompts as chunks from position 0, K/V written into a
  paged cache and each prompt's first token sampled (a colocated prefill step; disaggregated
  prefill runs the same forward and sends instead of writing, see `profile.dist`).
- decode: one step as the decode worker runs it: `DecodeScheduler.schedule`, `DecodeRunner.run`
  over the paged cache, `on_step_done`, the token appended and the stop check.

Times are wall-clock milliseconds after a device synchronize.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.decode_worker.runner import ChunkInput, DecodeRunner
from pdserve.decode_worker.scheduler import DecodeScheduler, DecodeSeq
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplingRow
from pdserve.engine.spec import EngineSpec
from pdserve.engine.stop import check_token_stop


@dataclass
class Target:
    """The model as a spec runs it: its config, one TP1 copy on the device, the thread count."""

    engine: EngineSpec
    config: ModelConfig
    model: CausalLM
    device: torch.device

    @classmethod
    def load(cls, engine: EngineSpec) -> Target:
        torch.set_num_threads(engine.num_threads)
        config = ModelConfig.from_pretrained(
            engine.model, dtype=engine.dtype, device=engine.device,
            max_model_len=engine.max_model_len,
        )  # fmt: skip
        device = torch.device(engine.device)
        return cls(engine, config, load_model(config, TPGroup.single(), device), device)

    def prompts(self, lens: Sequence[int], seed: int = 0) -> list[list[int]]:
        """Random prompts of these lengths, above the low ids where special tokens live."""
        g = torch.Generator().manual_seed(seed)
        vocab = self.config.vocab_size
        low = min(8, vocab - 1)
        return [torch.randint(low, vocab, (n,), generator=g).tolist() for n in lens]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class PrefillTimer:
    """Times a prefill step of `DecodeRunner.run` (forward + paged KV write + first tokens)."""

    def __init__(self, target: Target, max_tokens: int, max_seqs: int) -> None:
        bs = target.engine.block_size
        self.target = target
        self.blocks = BlockManager(math.ceil(max_tokens / bs) + max_seqs, bs)
        cache = allocate_kv_cache(target.config, 1, self.blocks.num_blocks, bs, target.device)
        self.runner = DecodeRunner(target.model, cache, bs, target.device)

    def __call__(self, lens: Sequence[int], seed: int = 0) -> float:
        prompts = self.target.prompts(lens, seed)
        tables = [self.blocks.allocate(i, n) for i, n in enumerate(lens)]
        chunks = [ChunkInput(p, 0, t, True) for p, t in zip(prompts, tables)]
        rows = [SamplingRow(greedy(1), p, ()) for p in prompts]
        try:
            self.target.sync()
            start = time.perf_counter()
            self.runner.run([], [], chunks, rows)
            self.target.sync()
            return (time.perf_counter() - start) * 1e3
        finally:
            for i in range(len(lens)):
                self.blocks.free(i)


class DecodeTimer:
    """Times decode steps of `batch` sequences at a context length, through the real path."""

    def __init__(self, target: Target, capacity_tokens: int) -> None:
        bs = target.engine.block_size
        self.target = target
        self.num_blocks = max(1, capacity_tokens // bs)
        cache = allocate_kv_cache(target.config, 1, self.num_blocks, bs, target.device)
        self.runner = DecodeRunner(target.model, cache, bs, target.device)

    def capacity_tokens(self) -> int:
        return self.num_blocks * self.target.engine.block_size

    def fits(self, batch: int, context: int, steps: int) -> bool:
        bs = self.target.engine.block_size
        return batch * math.ceil((context + steps + 2) / bs) <= self.num_blocks

    def _batch(self, batch: int, context: int, params: SamplingParams) -> DecodeScheduler:
        """A scheduler holding `batch` seqs whose prompts of `context` tokens are cached."""
        t = self.target
        max_len = min(t.config.max_model_len, self.capacity_tokens())
        sched = DecodeScheduler(BlockManager(self.num_blocks, t.engine.block_size), batch, max_len)
        for i, prompt in enumerate(t.prompts([context] * batch, seed=batch)):
            assert sched.reserve(i, context) is not None, "the timer sizes the cache for the batch"
            sched.activate(DecodeSeq(i, context, params.max_tokens, [*prompt, prompt[-1]]))
        return sched

    def __call__(self, batch: int, context: int, steps: int) -> list[tuple[int, int, float]]:
        """(batch, Σcontext at schedule time, ms) of `steps` timed steps after one untimed."""
        params = greedy(steps + 2)
        sched = self._batch(batch, context, params)
        out = []
        for k in range(steps + 1):
            context_sum, ms = self._step(sched, params)
            if k > 0:  # the first step warms the batch's shapes up
                out.append((batch, context_sum, ms))
        return out

    def _step(self, sched: DecodeScheduler, params: SamplingParams) -> tuple[int, float]:
        """(Σcontext of the step's seqs as the simulator counts it, ms)."""
        t, eos = self.target, self.target.config.eos_token_ids
        t.sync()
        start = time.perf_counter()
        step = sched.schedule()
        assert not step.preempted, "the timer sizes the cache for the batch"
        context_sum = sum(len(s.token_ids) for s in step.decode)
        table = sched.blocks.block_table
        rows = [
            SamplingRow(params, s.token_ids[: s.prompt_len], s.token_ids[s.prompt_len :])
            for s in step.decode
        ]
        result = self.runner.run(step.decode, [table(s.seq_id) for s in step.decode], [], rows)
        assert result is not None, "a decode step samples a token per sequence"
        sched.on_step_done(step.decode)
        for seq, token in zip(step.decode, result.token_ids):
            seq.token_ids.append(token)
            check_token_stop(token, seq.num_output, len(seq.token_ids), params, eos, 1 << 30)
        t.sync()
        return context_sum, (time.perf_counter() - start) * 1e3

    def mixed(self, batch: int, context: int, start: int, length: int) -> tuple[int, float]:
        """(Σcontext, ms) of one chunked-prefill step: `batch` seqs decode and positions
        [start, start + length) of another prompt prefill, in one forward."""
        t, params = self.target, greedy(4)
        sched = self._batch(batch, context, params)
        prompt = t.prompts([start + length], seed=7)[0]
        table = sched.blocks.allocate(-1, start + length)  # its first `start` positions: cached
        t.sync()
        begin = time.perf_counter()
        step = sched.schedule()
        rows = [SamplingRow(params, s.token_ids[: s.prompt_len], ()) for s in step.decode]
        rows.append(SamplingRow(params, prompt, ()))
        tables = [sched.blocks.block_table(s.seq_id) for s in step.decode]
        self.runner.run(step.decode, tables, [ChunkInput(prompt[start:], start, table, True)], rows)
        t.sync()
        return sum(len(s.token_ids) for s in step.decode), (time.perf_counter() - begin) * 1e3
