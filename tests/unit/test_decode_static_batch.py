"""Pure decode steps padded to a fixed batch size and run from static buffers (what a CUDA graph
replays) generate exactly what the plain path generates, and their padding rows write only the
scratch block. Capture and replay need CUDA (tests/gpu/test_cuda_attention.py); the padded path
runs the same code without them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _colocated import ColocatedEngine, StepRecord
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from pdserve.cluster.config.resolve import settle
from pdserve.cluster.config.schema import llm_keywords
from pdserve.cluster.config.spec import SpecError, load_spec
from pdserve.decode_worker import cuda_graphs
from pdserve.decode_worker.cuda_graphs import StaticDecode, capture_sizes, start_static
from pdserve.decode_worker.runner import DecodeRunner, build_engine, model_limits
from pdserve.decode_worker.seq import DecodeSeq
from pdserve.decode_worker.step import ChunkInput, StepBatch
from pdserve.engine import paged_flex_attention
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.sampling import Sampler
from pdserve.engine.sampling_params import SamplingParams

BS = 16
NUM_BLOCKS = 24  # the engine's; the cache holds one more, the scratch block
MAX_LEN = NUM_BLOCKS * BS
SIZES = (1, 2, 4)  # three sequences decode padded to 4: one padding row each step
MAX_NEW = 6
CPU = torch.device("cpu")

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


class CountingStatic(StaticDecode):
    """The padded path, counting the steps it ran."""

    steps = 0

    def forward(self, batch: StepBatch) -> torch.Tensor:
        self.steps += 1
        return super().forward(batch)


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, CausalLM]:
    # llama: GQA 4 query heads over 2 KV heads; mistral: a 128-token window the long prompt passes
    return {
        arch: load_model(ModelConfig.from_pretrained(str(tiny_models[arch])), TPGroup.single())
        for arch in ("llama", "mistral")
    }


def prompts(arch: str) -> list[list[int]]:
    g = torch.Generator().manual_seed(4)
    lens = (7, 33, 150) if arch == "mistral" else (7, 33, 16)
    return [torch.randint(6, 768, (n,), generator=g).tolist() for n in lens]


def generate(
    model: CausalLM, arch: str, params: SamplingParams, backend: str | None
) -> tuple[list[list[int]], CountingStatic | None, list[StepRecord]]:
    """Every prompt's tokens through a colocated engine; ``backend``: pure decode steps padded,
    attending through it (None: every step on the plain path)."""
    cache = allocate_kv_cache(model.config, 1, NUM_BLOCKS + 1, BS, CPU)
    static = None
    if backend is not None:
        max_blocks = MAX_LEN // BS
        static = CountingStatic(model, cache, BS, SIZES, max_blocks, NUM_BLOCKS, backend)
    runner = DecodeRunner(model, cache, BS, CPU, static)
    runner.sampler = Sampler(seed=0)
    engine = ColocatedEngine(
        budget=512, num_blocks=NUM_BLOCKS, block_size=BS, max_num_seqs=4, max_model_len=MAX_LEN,
        runner=runner,
    )  # fmt: skip
    for i, p in enumerate(prompts(arch)):
        engine.submit(i, p, params=params)
    records = engine.run()  # the engine's integrity is checked after every step
    assert engine.blocks.num_free_blocks == NUM_BLOCKS
    return [engine.outputs[i] for i in range(3)], static, records


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize(
    ("arch", "params"), [("llama", GREEDY), ("llama", SAMPLED), ("mistral", GREEDY)]
)
def test_padded_decode_steps_generate_what_the_plain_path_does(
    models: dict[str, CausalLM], arch: str, params: SamplingParams, backend: str
) -> None:
    want, _, _ = generate(models[arch], arch, params, None)
    got, static, records = generate(models[arch], arch, params, backend)
    assert got == want
    assert static is not None
    pure = [r for r in records if r.decode and not r.chunks and not r.recompute]
    assert static.steps == len(pure) >= MAX_NEW - 2  # every pure decode step went padded
    assert any(len(r.decode) == 3 for r in pure)  # and padding rows ran


def test_padding_rows_write_the_scratch_block_and_no_live_block(
    models: dict[str, CausalLM],
) -> None:
    model = models["llama"]
    cache = allocate_kv_cache(model.config, 1, NUM_BLOCKS + 1, BS, CPU)
    cache.normal_(generator=torch.Generator().manual_seed(0))
    before = cache.clone()
    static = StaticDecode(model, cache, BS, SIZES, MAX_LEN // BS, NUM_BLOCKS, "flex")
    tables = [[5, 9], [2], [11, 3, 7]]
    seqs = [DecodeSeq(i, 1, 4, list(range(6, 6 + n))) for i, n in enumerate((20, 3, 40))]
    batch = StepBatch(seqs, tables, [], [])
    hidden = static.forward(batch)  # 3 sequences padded to 4
    assert hidden.shape == (3, model.config.hidden_size)
    written = {
        (t[(len(s.token_ids) - 1) // BS], (len(s.token_ids) - 1) % BS) for s, t in zip(seqs, tables)
    }
    changed = (cache != before).flatten(start_dim=4).any(-1)  # [layers, blocks, 2, BS]
    for block in range(NUM_BLOCKS):
        for offset in range(BS):
            assert bool(changed[:, block, :, offset].any()) == ((block, offset) in written)
    assert changed[:, NUM_BLOCKS, :, 0].all()  # the padding row's K and V, every layer
    assert not changed[:, NUM_BLOCKS, :, 1:].any()


# ops a CUDA graph cannot hold: a host sync (item, a data-dependent size) or a tensor made from
# Python values (an upload from pageable memory while the stream captures)
HOST_SYNCS = ("item", "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select",
              "unique", "lift_fresh", "_assert_async")  # fmt: skip


class OpLog(TorchDispatchMode):
    """Every ATen op run while it is active (what a capture records, on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_padded_step_holds_no_op_a_cuda_graph_cannot_capture(
    models: dict[str, CausalLM], arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the eager step a capture records, op by op; the flex call itself is one compiled kernel
    # on CUDA (its graph is checked in test_paged_flex_attention), so it runs unlogged here
    cache = allocate_kv_cache(models[arch].config, 1, NUM_BLOCKS + 1, BS, CPU)
    static = StaticDecode(models[arch], cache, BS, SIZES, MAX_LEN // BS, NUM_BLOCKS, "flex")
    static._fill([5, 6], [3, 140], [[0], [1, 2, 4, 7, 8, 9, 10, 11, 12]], 4)
    flex = paged_flex_attention._paged_flex

    def unlogged(*args: Any) -> torch.Tensor:
        with _disable_current_modes():
            return flex(*args)

    monkeypatch.setattr(paged_flex_attention, "_paged_flex", unlogged)
    with torch.inference_mode(), OpLog() as log:
        static._forward(4)
    assert {"linear", "index_copy_", "gather", "scatter_"} <= log.ops  # it saw the step
    assert not log.ops & set(HOST_SYNCS)


def test_steps_that_do_not_fit_take_the_plain_path(models: dict[str, CausalLM]) -> None:
    cache = allocate_kv_cache(models["llama"].config, 1, NUM_BLOCKS + 1, BS, CPU)
    static = StaticDecode(models["llama"], cache, BS, (1, 2), 4, NUM_BLOCKS, "flex")
    seq = DecodeSeq(0, 1, 4, [6, 7])
    assert static.takes(StepBatch([seq], [[1]], [], []))
    assert not static.takes(StepBatch([seq] * 3, [[1]] * 3, [], []))  # over the largest size
    assert not static.takes(StepBatch([seq], [[1] * 5], [], []))  # over max_blocks
    assert not static.takes(StepBatch([seq], [[1]], [], [], [[8]]))  # drafts
    chunk = ChunkInput([6, 7], 0, [2], sample=True)
    assert not static.takes(StepBatch([seq], [[1]], [chunk], []))  # a mixed step
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        static.capture()


def test_a_flex_path_that_fails_to_start_falls_back_to_sdpa_unless_asked_for(
    models: dict[str, CausalLM], caplog: pytest.LogCaptureFixture
) -> None:
    """On CUDA, start-up captures the graphs (CPU refuses to: the failure stands in for a
    kernel a GPU cannot build). Chosen by auto, the replica then runs SDPA steps and says so;
    asked for explicitly, the error stands."""
    cache = allocate_kv_cache(models["llama"].config, 1, NUM_BLOCKS + 1, BS, CPU)
    static = StaticDecode(models["llama"], cache, BS, (1, 2), 4, NUM_BLOCKS, "flex")
    assert start_static(static, graphs=False, required=True) is static  # one compile: fine
    with caplog.at_level("WARNING"):
        assert start_static(static, graphs=True, required=False) is None
    assert "decode steps run on SDPA instead" in caplog.text and static.graphs == {}
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        start_static(static, graphs=True, required=True)


def test_a_start_that_left_the_device_broken_fails_rather_than_falling_back(
    models: dict[str, CausalLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    # an error CUDA keeps (an illegal memory access) would fail every SDPA step after it
    cache = allocate_kv_cache(models["llama"].config, 1, NUM_BLOCKS + 1, BS, CPU)
    static = StaticDecode(models["llama"], cache, BS, (1, 2), 4, NUM_BLOCKS, "flex")
    monkeypatch.setattr(cuda_graphs, "_device_usable", lambda device: False)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        start_static(static, graphs=True, required=False)


def test_build_engine_pads_decode_for_flex_only(models: dict[str, CausalLM]) -> None:
    model = models["llama"]
    limits = model_limits(model, NUM_BLOCKS, BS, MAX_LEN, max_num_seqs=6)
    flex = build_engine(model, limits, CPU, attention_backend="flex", enforce_eager=False)
    runner = flex.runner
    assert isinstance(runner, DecodeRunner) and runner.static is not None
    assert runner.static.sizes == (1, 2, 4, 6) and runner.static.graphs == {}  # CPU: no graphs
    assert runner.kv_cache.shape[1] == NUM_BLOCKS + 1 == runner.static.scratch + 1
    assert flex.blocks.num_blocks == NUM_BLOCKS and flex.check_integrity() == 0
    plain = build_engine(model, limits, CPU)  # auto is sdpa on CPU
    assert isinstance(plain.runner, DecodeRunner) and plain.runner.static is None
    assert plain.runner.kv_cache.shape[1] == NUM_BLOCKS
    with pytest.raises(ValueError, match="attention_backend: flex reads the KV cache in place"):
        build_engine(model, limits, CPU, kv_dtype="int8", attention_backend="flex")


def test_capture_sizes() -> None:
    assert capture_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert capture_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert capture_sizes(1) == (1,)
    assert capture_sizes(64, [8, 1, 8, 3]) == (1, 3, 8)


def test_spec_settles_the_cuda_graph_keys() -> None:
    decode = {"enforce_eager": True, "cudagraph_capture_sizes": [8, 1, 2, 8]}
    settled = settle(load_spec({"name": "t", "decode": decode}), "cpu").decode
    assert settled.enforce_eager and settled.cudagraph_capture_sizes == (1, 2, 8)
    default = settle(load_spec({"name": "t"}), "cpu").decode
    assert not default.enforce_eager and default.cudagraph_capture_sizes is None
    with pytest.raises(SpecError, match=r"\[128\] exceed max_num_seqs \(64\)"):
        load_spec({"name": "t", "decode": {"cudagraph_capture_sizes": [1, 128]}})
    with pytest.raises(SpecError, match=r"cudagraph_capture_sizes: must be a list of batch"):
        load_spec({"name": "t", "decode": {"cudagraph_capture_sizes": [0, 2]}})
    table = llm_keywords()
    assert table["enforce_eager"] == ("decode", "enforce_eager")
    assert table["cudagraph_capture_sizes"] == ("decode", "cudagraph_capture_sizes")
