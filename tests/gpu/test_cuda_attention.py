"""The CUDA decode path: compiled flex attention over the paged cache, and decode steps replayed
as CUDA graphs. Skipped without a GPU (run them on a GPU machine with `pytest -m gpu`).

On CPU the unit tests check the same paths eagerly (tests/unit/test_paged_flex_attention.py,
tests/unit/test_decode_static_batch.py); here the compiled kernel follows the block list, and
graphs replay what was captured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdserve.decode_worker.cuda_graphs import StaticDecode
from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.runner import DecodeRunner, model_limits
from pdserve.decode_worker.step import StepBatch
from pdserve.engine.config import ModelConfig
from pdserve.engine.decode_attention import FLEX, DecodeMetadata, decode_attention, plan_decode
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.request import DecodeRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tiny_model import make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
BS = 16
NUM_BLOCKS = 96
TABLE_WIDTH = 24  # blocks per table row: room for 384 tokens
MAX_NEW = 24


def _paged(lens: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled block tables for ``lens`` tokens each, padded with another sequence's block."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in lens]
    width = TABLE_WIDTH  # the same shapes every step: the compiled kernel is reused
    padded = [t + [tables[0][0]] * (width - len(t)) for t in tables]
    return torch.tensor(padded, device=CUDA), torch.tensor(lens, device=CUDA)


@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads", "window"),
    [
        (torch.bfloat16, 8, 2, None),
        (torch.float32, 8, 2, None),
        (torch.float32, 6, 2, None),  # a group of 3: not a power of two
        (torch.bfloat16, 4, 4, 40),
    ],
)
def test_compiled_flex_attends_as_sdpa(
    dtype: torch.dtype, heads: int, kv_heads: int, window: int | None
) -> None:
    g = torch.Generator(device=CUDA).manual_seed(0)
    cache = torch.randn(NUM_BLOCKS, 2, BS, kv_heads, 64, device=CUDA, generator=g).to(dtype)
    group = heads // kv_heads
    for step, lens in enumerate([[1, 16, 17, 250, 33], [100, 2, 64, 15, 300]]):
        tables, ctx = _paged(lens, seed=step)
        q = torch.randn(len(lens), heads, 64, device=CUDA, generator=g).to(dtype)
        slots = torch.zeros(len(lens), dtype=torch.int64, device=CUDA)
        outs = []
        for backend in ("sdpa", FLEX):
            meta = DecodeMetadata(tables, ctx, slots, backend=backend)
            plan = plan_decode(meta, BS, window, num_blocks=NUM_BLOCKS, group=group)
            if step == 1 and backend == FLEX:  # same shapes, a new block mask: no recompile
                with torch._dynamo.config.patch(error_on_recompile=True):
                    outs.append(decode_attention(q, cache, plan, 0.125))
            else:
                outs.append(decode_attention(q, cache, plan, 0.125))
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
        torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)


class CountingReplays(StaticDecode):
    """The padded path, counting steps served by a captured graph."""

    replays = 0

    def forward(self, batch: StepBatch) -> torch.Tensor:
        size = next(s for s in self.sizes if s >= len(batch.seqs))
        self.replays += size in self.graphs
        return super().forward(batch)


def _decode(model: CausalLM, prompts: list[list[int]], how: str) -> tuple[list[list[int]], Any]:
    """Greedy tokens of every prompt through a decode engine: ``how`` is "plain" (SDPA, no
    padding), "eager" (padded flex steps, not captured) or "graphs" (captured and replayed)."""
    limits = model_limits(model, NUM_BLOCKS, BS, NUM_BLOCKS * BS, max_num_seqs=4)
    cache = allocate_kv_cache(model.config, 1, NUM_BLOCKS + 1, BS, CUDA)
    static = None
    if how != "plain":
        static = CountingReplays(model, cache, BS, (1, 2, 4), NUM_BLOCKS, NUM_BLOCKS, FLEX)
        if how == "graphs":
            static.capture()
    engine = DecodeEngine(DecodeRunner(model, cache, BS, CUDA, static), limits)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        assert engine.reserve(DecodeRequest(i, str(i), tuple(p), params, local_prefill=True))
    while engine.has_work:
        for tid, delta in engine.step():
            out[tid] += delta.token_ids
    assert engine.check_integrity() == 0
    return [out[i] for i in range(len(prompts))], static


def _prompts(lens: tuple[int, ...]) -> list[list[int]]:
    # test_model_parity's prompts: greedy margins far above float32 rounding
    g = torch.Generator().manual_seed(4)
    return [torch.randint(6, 768, (n,), generator=g).tolist() for n in lens]


def test_cuda_graph_replays_the_eager_tokens(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "tiny", "llama")
    model = load_model(
        ModelConfig.from_pretrained(str(path), dtype="float32"), TPGroup.single(), CUDA
    )
    prompts = _prompts((1, 7, 100))  # three sequences: padded to 4
    plain, _ = _decode(model, prompts, "plain")
    eager, _ = _decode(model, prompts, "eager")
    graphs, static = _decode(model, prompts, "graphs")
    assert set(static.graphs) == {1, 2, 4}
    assert static.replays >= MAX_NEW - 2  # the decode steps replayed a graph
    assert graphs == eager == plain


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_llm_on_cuda_with_flex_and_graphs_matches_transformers(tmp_path: Path, arch: str) -> None:
    from pdserve.cluster import LLM

    path = make_tiny_model(tmp_path / arch, arch)
    prompts = _prompts((1, 7, 100, 300))  # mistral: 300 tokens pass its 128-token window
    hf: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    want = []
    with torch.no_grad():
        for p in prompts:
            seq = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW)
            want.append(seq[0, len(p) :].tolist())
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    with LLM(
        str(path), mode="colocated", device="cuda", dtype="float32", max_num_seqs=4,
        attention_backend="flex",  # graphs are on by default (enforce_eager=False)
        kv_cache_memory="1GiB",  # not auto's 90% of the GPU: millions of tiny-model blocks
    ) as llm:  # fmt: skip
        assert llm.config.decode.attention_backend == "flex"
        assert not llm.config.decode.enforce_eager
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.check_integrity() == 0
    assert got == want
