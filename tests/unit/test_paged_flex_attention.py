"""The flex decode path reads the paged cache in place and attends exactly as the SDPA path
(the reference) does: shuffled block tables, context lengths on and off block boundaries, GQA
groups of any size, sliding windows, shared prefix blocks. Eager flex on CPU evaluates the
mask over every slot; the block list the compiled CUDA kernel follows is checked against it."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from pdserve.cluster.config.schema import llm_keywords
from pdserve.cluster.config.spec import SpecError, load_spec
from pdserve.engine.decode_attention import (
    FLEX,
    DecodeMetadata,
    decode_attention,
    plan_decode,
)
from pdserve.engine.paged_flex_attention import (
    _paged_flex,
    allow_compiled_shapes,
    compiled_flex,
    plan_flex_decode,
    resolve_attention_backend,
)

BS = 4  # small blocks: many of them, and context lengths on every offset
NUM_BLOCKS = 24
LENS = (1, 3, 4, 5, 13, 16, 22)
SHARING = (22, 1, 4, 5, 13, 9)  # the last sequence shares the first one's two leading blocks

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def paged_case(
    lens: tuple[int, ...], seed: int, share_prefix: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables of sequences with ``lens`` tokens over shuffled blocks, padded with a block
    another sequence owns (a mask that trusted the padding would leak it); with
    ``share_prefix`` the last sequence holds the first one's leading full blocks."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in lens]
    if share_prefix:
        shared = lens[-1] // BS if lens[0] >= lens[-1] else 0
        assert shared > 0, "the first sequence must cover the last one's full blocks"
        tables[-1][:shared] = tables[0][:shared]
    width = max(len(t) for t in tables)
    padded = [t + [tables[0][0]] * (width - len(t)) for t in tables]
    return torch.tensor(padded), torch.tensor(lens)


def both_paths(
    tables: torch.Tensor,
    ctx: torch.Tensor,
    heads: int,
    kv_heads: int,
    window: int | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(NUM_BLOCKS, 2, BS, kv_heads, 16, generator=g).to(dtype)
    q = torch.randn(len(ctx), heads, 16, generator=g).to(dtype)
    slots = torch.zeros(len(ctx), dtype=torch.int64)  # unused: attention only reads
    plans = [
        plan_decode(
            DecodeMetadata(tables, ctx, slots, backend=backend),
            BS,
            window,
            num_blocks=NUM_BLOCKS,
            group=heads // kv_heads,
        )
        for backend in ("sdpa", FLEX)
    ]
    sdpa, flex = (decode_attention(q, cache, plan, 0.25) for plan in plans)
    return sdpa, flex


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (6, 2), (3, 3)])
@pytest.mark.parametrize("window", [None, 5, 9])
def test_flex_attends_as_sdpa(heads: int, kv_heads: int, window: int | None) -> None:
    # (6, 2): a group of 3, which flex's enable_gqa decode kernel would not take
    tables, ctx = paged_case(LENS, seed=heads * 7 + (window or 0))
    sdpa, flex = both_paths(tables, ctx, heads, kv_heads, window)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_flex_attends_as_sdpa_over_shared_prefix_blocks_in_bfloat16() -> None:
    tables, ctx = paged_case(SHARING, seed=3, share_prefix=True)
    sdpa, flex = both_paths(tables, ctx, 4, 2, None, torch.bfloat16)
    assert flex.dtype == torch.bfloat16
    torch.testing.assert_close(flex, sdpa, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("window", [None, 6])
def test_mask_sees_exactly_each_querys_positions(window: int | None) -> None:
    tables, ctx = paged_case(SHARING, seed=5, share_prefix=True)
    plan = plan_flex_decode(tables, ctx, BS, window, NUM_BLOCKS, group=2).block_mask
    q_len, kv_len = plan.seq_lengths
    dense = create_mask(plan.mask_mod, len(SHARING), 1, q_len, kv_len, device="cpu")[:, 0]
    for b, n in enumerate(SHARING):
        assert torch.equal(dense[b, 0], dense[b, 1])  # a row's queries share one position
        seen = set()
        for row in dense[b, 0].nonzero().flatten().tolist():
            half, offset = divmod(row, BS)
            assert half % 2 == 0, "a V row is used as a key"
            seen.add(tables[b].tolist().index(half // 2) * BS + offset)
        lowest = 0 if window is None else max(0, n - window)
        assert seen == set(range(lowest, n))


@pytest.mark.parametrize("window", [None, 6])
def test_block_list_holds_every_visible_page_and_only_the_sequences_own(
    window: int | None,
) -> None:
    # the compiled kernel loads only the listed pages: a visible slot outside them is lost
    tables, ctx = paged_case(LENS, seed=6)
    mask = plan_flex_decode(tables, ctx, BS, window, NUM_BLOCKS, group=1).block_mask
    dense = create_mask(mask.mask_mod, len(LENS), 1, *mask.seq_lengths, device="cpu")
    pages_seen = dense[:, 0, 0].view(len(LENS), -1, BS).any(-1)  # [B, 2N - 1] K/V halves
    for b, n in enumerate(LENS):
        listed = mask.kv_indices[b, 0, 0, : int(mask.kv_num_blocks[b, 0, 0])].tolist()
        assert len(set(listed)) == len(listed)
        assert set(pages_seen[b].nonzero().flatten().tolist()) <= set(listed)
        own = {2 * block for block in tables[b, : -(-n // BS)].tolist()}
        assert set(listed) <= own


def test_compiled_call_traces_whole_and_compiles_once_per_batch_size() -> None:
    # the graph CUDA compiles with inductor, traced here by aot_eager (no GPU): one whole graph
    # (fullgraph, the mask closure included), one compilation per padded batch size, and a
    # step's new tables, lengths and closure reuse it (a recompile would land inside a capture)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = compiled_flex("aot_eager")
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(NUM_BLOCKS, 2, BS, 2, 16, generator=g)
    for step, lens in enumerate([(5, 13, 1, 22), (16, 4, 9, 3), LENS, (2, 17, 8, 11)]):
        tables, ctx = paged_case(lens, seed=step)
        # one width for every step: the decode runner pads tables to max_blocks
        tables = torch.cat([tables, tables[:, :1].expand(-1, 8 - tables.shape[1])], 1)
        mask = plan_flex_decode(tables, ctx, BS, None, NUM_BLOCKS, group=3).block_mask
        q = torch.randn(len(lens), 2, 3, 16, generator=g)
        torch.testing.assert_close(
            compiled(q, cache, mask, 0.25), _paged_flex(q, cache, mask, 0.25)
        )
    assert torch._dynamo.utils.counters["aot_autograd"]["total"] == 2  # batch sizes 4 and 7
    assert not torch._dynamo.utils.counters["graph_break"]


def test_auto_is_flex_on_cuda_with_a_cache_in_the_model_dtype_only() -> None:
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    assert resolve_attention_backend("auto", cuda, bf16, bf16) == "flex"
    assert resolve_attention_backend("auto", cpu, bf16, bf16) == "sdpa"
    assert resolve_attention_backend("auto", cuda, torch.int8, bf16) == "sdpa"
    assert resolve_attention_backend("auto", cuda, torch.float32, bf16) == "sdpa"
    assert resolve_attention_backend("flex", cpu, bf16, bf16) == "flex"
    assert resolve_attention_backend("sdpa", cuda, bf16, bf16) == "sdpa"
    with pytest.raises(ValueError, match=r"decode\.kv_cache\.dtype to auto"):
        resolve_attention_backend("flex", cuda, torch.float8_e4m3fn, bf16)


@pytest.mark.parametrize("block_size", [8, 24, 48])
def test_flex_needs_pages_its_kernel_can_tile(block_size: int) -> None:
    # the CUDA decode kernel clips its key tile to one page, and Triton tiles are powers of 2
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert resolve_attention_backend("auto", cuda, bf16, bf16, block_size) == "sdpa"
    assert resolve_attention_backend("auto", cuda, bf16, bf16, 2 * 16) == "flex"
    with pytest.raises(ValueError, match="write block_size: 16"):
        resolve_attention_backend("flex", cuda, bf16, bf16, block_size)
    spec = {"name": "t", "decode": {"attention_backend": "flex", "block_size": block_size}}
    with pytest.raises(SpecError, match="power-of-two page of at least 16 tokens"):
        load_spec(spec)
    assert load_spec({"name": "t", "decode": {"block_size": block_size}})  # auto: sdpa there


def test_every_capture_size_may_compile_without_a_recompile_limit_failure() -> None:
    # past Dynamo's recompile limit a fullgraph compile fails: a vLLM-style list of dozens of
    # capture sizes raises the limit above its length
    with torch._dynamo.config.patch(recompile_limit=8):
        allow_compiled_shapes(67)
        assert torch._dynamo.config.recompile_limit == 68
        allow_compiled_shapes(3)  # never lowered
        assert torch._dynamo.config.recompile_limit == 68


def test_flex_refuses_a_cache_in_another_dtype() -> None:
    tables, ctx = paged_case((5,), seed=0)
    meta = DecodeMetadata(tables, ctx, torch.zeros(1, dtype=torch.int64), backend=FLEX)
    plan = plan_decode(meta, BS, None, num_blocks=NUM_BLOCKS, group=1)
    cache = torch.zeros(NUM_BLOCKS, 2, BS, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="reads the cache in place"):
        decode_attention(torch.zeros(1, 1, 16), cache, plan, 0.25)


def test_spec_rejects_flex_over_a_quantized_kv_cache_and_names_the_fix() -> None:
    spec = {"name": "t", "decode": {"attention_backend": "flex", "kv_cache": {"dtype": "int8"}}}
    with pytest.raises(SpecError, match="write attention_backend: sdpa") as info:
        load_spec(spec)
    assert info.value.problems[0].startswith("decode: attention_backend: flex")
    spec["decode"]["attention_backend"] = "flash"  # type: ignore[index]
    with pytest.raises(SpecError, match="must be one of auto, sdpa, flex"):
        load_spec(spec)
    assert load_spec({"name": "t"}).decode.attention_backend == "auto"
    assert llm_keywords()["attention_backend"] == ("decode", "attention_backend")
