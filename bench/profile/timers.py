"""Timed engine calls for `pdserve profile`, in this process, on the real engine code.

- prefill: a `DecodeEngine` step over whole prompts, K/V written into a paged cache and each
  prompt's first token sampled (a colocated prefill step; disaggregated prefill runs the same
  forward and sends instead of writing, see `profile.dist`).
- decode: one `DecodeEngine` step as a decode replica runs it (plan, prepare, forward over the
  paged cache, commit: tokens appended, stops checked).

Times are wall-clock milliseconds after a device synchronize.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.runner import build_engine, model_limits
from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import DeploymentConfig
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.request import DecodeRequest
from pdserve.engine.sampling_params import SamplingParams


@dataclass
class Target:
    """The model as a spec runs it: its config, one TP1 copy on the device, the thread count."""

    deployment: DeploymentConfig
    config: ModelConfig
    model: CausalLM
    device: torch.device

    @classmethod
    def load(cls, deployment: DeploymentConfig) -> Target:
        torch.set_num_threads(deployment.model.num_threads)
        config = ModelConfig.of(deployment.model)
        device = torch.device(deployment.model.device)
        return cls(deployment, config, load_model(config, TPGroup.single(), device), device)

    @property
    def block_size(self) -> int:
        return self.deployment.decode.block_size

    @property
    def threads(self) -> int:
        return self.deployment.model.num_threads

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
    """Times a colocated prefill step, `DecodeEngine.step` over whole prompts: forward, paged
    KV write and first tokens."""

    def __init__(self, target: Target, max_tokens: int, max_seqs: int) -> None:
        bs = target.block_size
        self.target = target
        blocks = math.ceil(max_tokens / bs) + max_seqs
        self.limits = model_limits(
            target.model, blocks, bs, min(target.config.max_model_len, blocks * bs),
            max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens,
        )  # fmt: skip
        self.runner = build_engine(target.model, self.limits, target.device).runner

    def __call__(self, lens: Sequence[int], seed: int = 0) -> float:
        engine = DecodeEngine(self.runner, self.limits)
        for i, prompt in enumerate(self.target.prompts(lens, seed)):
            engine.reserve(DecodeRequest(i, "profile", tuple(prompt), greedy(2), True))
        self.target.sync()
        start = time.perf_counter()
        outputs = engine.step()
        self.target.sync()
        ms = (time.perf_counter() - start) * 1e3
        assert len(outputs) == len(lens) and not len(engine.prefills), "one step, every prompt"
        return ms


class DecodeTimer:
    """Times decode steps of `batch` sequences at a context length, through the real path."""

    def __init__(self, target: Target, capacity_tokens: int) -> None:
        bs = target.block_size
        self.target = target
        self.num_blocks = max(1, capacity_tokens // bs)
        limits = model_limits(target.model, self.num_blocks, bs, self.capacity_tokens())
        self.runner = build_engine(target.model, limits, target.device).runner

    def capacity_tokens(self) -> int:
        return self.num_blocks * self.target.block_size

    def fits(self, batch: int, context: int, steps: int) -> bool:
        bs = self.target.block_size
        return batch * math.ceil((context + steps + 2) / bs) <= self.num_blocks

    def _engine(self, batch: int, context: int, max_tokens: int, **knobs: Any) -> DecodeEngine:
        """An engine holding `batch` seqs whose prompts of `context` tokens are cached (their
        KV landed as from a prefill, their first token the prompt's last)."""
        t = self.target
        max_len = min(t.config.max_model_len, self.capacity_tokens())
        knobs.setdefault("max_num_seqs", batch)
        limits = model_limits(t.model, self.num_blocks, t.block_size, max_len, **knobs)
        engine = DecodeEngine(self.runner, limits)
        heads = t.config.num_kv_heads
        for i, prompt in enumerate(t.prompts([context] * batch, seed=batch)):
            req = DecodeRequest(i, "profile", tuple(prompt), greedy(max_tokens))
            assert engine.reserve(req) is not None, "the timer sizes the cache for the batch"
            engine.kv_landed(i, heads, 0, 0.0, prompt[-1])
        return engine

    def __call__(self, batch: int, context: int, steps: int) -> list[tuple[int, int, float]]:
        """(batch, Σcontext at schedule time, ms) of `steps` timed steps after one untimed."""
        engine = self._engine(batch, context, steps + 2)
        out = []
        for k in range(steps + 1):
            context_sum, ms = self._step(engine)
            if k > 0:  # the first step warms the batch's shapes up
                out.append((batch, context_sum, ms))
        return out

    def _step(self, engine: DecodeEngine) -> tuple[int, float]:
        """(Σcontext of the step's seqs as the simulator counts it, ms) of one engine step."""
        t = self.target
        t.sync()
        start = time.perf_counter()
        step = engine.plan()
        assert step is not None and not step.out.preempted, "the timer sizes the cache"
        context_sum = sum(len(s.token_ids) for s in step.out.decode)
        assert engine.runner is not None
        engine.commit(step, engine.runner.run(engine.prepare(step)))
        t.sync()
        return context_sum, (time.perf_counter() - start) * 1e3

    def mixed(self, batch: int, context: int, start: int, length: int) -> tuple[int, float]:
        """(Σcontext, ms) of one chunked-prefill step: `batch` seqs decode and positions
        [start, start + length) of another prompt prefill, in one forward."""
        t = self.target
        engine = self._engine(
            batch, context, 4, max_num_seqs=batch + 1,
            max_num_batched_tokens=batch + length, chunked_prefill=True,
        )  # fmt: skip
        prompt = t.prompts([start + length], seed=7)[0]
        req = DecodeRequest(-1, "profile", tuple(prompt), greedy(4), True)
        engine.reserve(req, num_computed=start)  # its first `start` positions count as cached
        t.sync()
        begin = time.perf_counter()
        step = engine.plan()
        assert step is not None and [c.num_tokens for c in step.chunks] == [length]
        context_sum = sum(len(s.token_ids) for s in step.out.decode)
        assert engine.runner is not None
        engine.commit(step, engine.runner.run(engine.prepare(step)))
        t.sync()
        return context_sum, (time.perf_counter() - begin) * 1e3
