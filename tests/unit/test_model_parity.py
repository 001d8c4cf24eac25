"""Our model with a paged cache generates exactly what transformers generates (float32, greedy)."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pdserve.engine.attention import DecodeMetadata, PrefillMetadata
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache, kv_rows
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM, KVHook
from pdserve.engine.parallel import (
    TPGroup,
    is_kv_sender,
    kv_head_range,
    make_process_group,
)
from pdserve.engine.tiny_model import TINY_ARCHS

PROMPT_LENS = (1, 7, 100, 300)
MAX_NEW = 32
BLOCK_SIZE = 16
NO_COMM = cast(dist.ProcessGroup, object())  # for TP ranks built but never run


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    # Seed picked so that along every reference trajectory the top-2 logits differ by > 2e-3,
    # ~1000x our float32 deviation from transformers (~3e-6): parity cannot flip on rounding.
    g = torch.Generator().manual_seed(4)
    # ids from 6 up: the tiny vocab starts with six special tokens
    return [torch.randint(6, 768, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_greedy(
    tiny_models: dict[str, Path], prompts: list[list[int]]
) -> Callable[[str], list[list[int]]]:
    """arch -> transformers' greedy continuation of each prompt, one prompt at a time, memoised."""
    memo: dict[str, list[list[int]]] = {}

    def run(arch: str) -> list[list[int]]:
        if arch not in memo:
            hf: Any = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
            hf.generation_config.eos_token_id = None  # always MAX_NEW tokens, as our loop does
            outs = []
            for p in prompts:
                ids = torch.tensor([p])
                with torch.no_grad():
                    seq = hf.generate(ids, do_sample=False, max_new_tokens=MAX_NEW)
                outs.append(seq[0, len(p) :].tolist())
            memo[arch] = outs
        return memo[arch]

    return run


def paged_greedy(
    model: CausalLM, prompts: list[list[int]], max_new: int, kv_hook: KVHook | None = None
) -> list[list[int]]:
    """Prefill all prompts packed into one pass, then decode them as one batch of B sequences."""
    config, tp, bs = model.config, model.tp, BLOCK_SIZE
    need = [-(-(len(p) + max_new) // bs) for p in prompts]
    num_blocks = sum(need) + 3
    # Scattered, out-of-order block ids, the same on every TP rank.
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    starts = [0, *accumulate(need)]
    tables = [perm[starts[i] : starts[i + 1]] for i in range(len(prompts))]
    cache = allocate_kv_cache(config, tp.size, num_blocks, bs, "cpu")

    def slot(i: int, pos: int) -> int:
        return tables[i][pos // bs] * bs + pos % bs

    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    slots = torch.tensor([slot(i, j) for i, n in enumerate(lens) for j in range(n)])
    hidden = model(ids, positions, PrefillMetadata(lens, slots), cache, kv_hook)
    last = torch.tensor(list(accumulate(lens))) - 1
    tokens = model.compute_logits(hidden[last]).argmax(-1)
    out = [[t] for t in tokens.tolist()]
    block_tables = torch.tensor([t + [0] * (max(need) - len(t)) for t in tables])
    for _ in range(max_new - 1):
        pos = torch.tensor(lens)  # the position of the token decoded now
        step_slots = torch.tensor([slot(i, n) for i, n in enumerate(lens)])
        meta = DecodeMetadata(block_tables, pos + 1, step_slots)
        tokens = model.compute_logits(model(tokens, pos, meta, cache)).argmax(-1)
        for seq, t in zip(out, tokens.tolist(), strict=True):
            seq.append(t)
        lens = [n + 1 for n in lens]
    return out


def assert_same_as_hf(ours: list[list[int]], ref: list[list[int]]) -> None:
    for n, mine, theirs in zip(PROMPT_LENS, ours, ref, strict=True):
        assert len(theirs) == MAX_NEW
        assert mine == theirs, f"prompt of {n} tokens diverged"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_matches_transformers(
    arch: str, tiny_models: dict[str, Path], prompts: list[list[int]], hf_greedy: Callable
) -> None:
    config = ModelConfig.from_pretrained(str(tiny_models[arch]))
    model = load_model(config, TPGroup.single())
    assert_same_as_hf(paged_greedy(model, prompts, MAX_NEW), hf_greedy(arch))


def _tp2_greedy(path: Path, prompts: list[list[int]]) -> list[list[list[int]]]:
    """Run both ranks of a TP=2 group in two threads of this process, gloo over one TCPStore."""
    timeout = datetime.timedelta(seconds=60)
    master = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timeout, wait_for_workers=False)
    config = ModelConfig.from_pretrained(str(path))

    def rank_main(rank: int) -> list[list[int]]:
        store = master if rank == 0 else dist.TCPStore("127.0.0.1", master.port, 2, False)
        pg = make_process_group("gloo", store, rank, 2, timeout_s=60)
        model = load_model(config, TPGroup(rank, 2, pg))
        shapes: list[tuple[int, ...]] = []
        out = paged_greedy(model, prompts, MAX_NEW, lambda _, k, v: shapes.append(k.shape))
        # each rank holds one of the two KV heads
        assert set(shapes) == {(sum(PROMPT_LENS), 1, config.head_dim)}
        return out

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(rank_main, range(2)))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tp2_greedy_matches_transformers(
    arch: str, tiny_models: dict[str, Path], prompts: list[list[int]], hf_greedy: Callable
) -> None:
    rank0, rank1 = _tp2_greedy(tiny_models[arch], prompts)
    assert rank0 == rank1
    assert_same_as_hf(rank0, hf_greedy(arch))


def test_sliding_window_changes_long_prompts(tiny_models: dict[str, Path]) -> None:
    # The Mistral parity test only proves the window path if the window matters at 300 tokens.
    config = ModelConfig.from_pretrained(str(tiny_models["mistral"]))
    assert config.sliding_window is not None and config.sliding_window < 300
    windowed = load_model(config, TPGroup.single())
    full = load_model(dataclasses.replace(config, sliding_window=None), TPGroup.single())
    ids = torch.randint(6, 768, (300,), generator=torch.Generator().manual_seed(5))
    meta = PrefillMetadata([300])
    a = windowed.compute_logits(windowed(ids, torch.arange(300), meta))
    b = full.compute_logits(full(ids, torch.arange(300), meta))
    w = config.sliding_window
    torch.testing.assert_close(a[:w], b[:w])  # inside the window: identical
    assert (a[w:] - b[w:]).abs().max() > 1e-2


def test_kv_hook_sees_every_layer_before_attention(tiny_models: dict[str, Path]) -> None:
    config = ModelConfig.from_pretrained(str(tiny_models["qwen3"]))
    model = load_model(config, TPGroup.single())
    cache = allocate_kv_cache(config, 1, num_blocks=2, block_size=8, device="cpu")
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    ids, slots = torch.arange(6, 16), torch.arange(3, 13)
    model(ids, torch.arange(10), PrefillMetadata([10], slots), cache,
          lambda layer, k, v: seen.append((layer, k.clone(), v.clone())))  # fmt: skip
    assert [layer for layer, _, _ in seen] == list(range(config.num_layers))
    flat = cache.view(config.num_layers, -1, config.num_kv_heads, config.head_dim)
    rows = kv_rows(slots, 8)
    for layer, k, v in seen:
        assert k.shape == v.shape == (10, config.num_kv_heads, config.head_dim)
        # the hook gets exactly what the cache stores (after k-norm and RoPE)
        torch.testing.assert_close(flat[layer, rows], k, rtol=0, atol=0)
        torch.testing.assert_close(flat[layer, rows + 8], v, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("num_kv_heads", "tp_size", "ranges", "senders"),
    [
        (8, 1, [(0, 8)], [True]),
        (8, 2, [(0, 4), (4, 8)], [True, True]),
        (2, 2, [(0, 1), (1, 2)], [True, True]),
        (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)], [True, False, True, False]),
        (1, 2, [(0, 1), (0, 1)], [True, False]),
    ],
)
def test_kv_heads_per_rank(
    num_kv_heads: int, tp_size: int, ranges: list[tuple[int, int]], senders: list[bool]
) -> None:
    assert [kv_head_range(num_kv_heads, r, tp_size) for r in range(tp_size)] == ranges
    assert [is_kv_sender(num_kv_heads, r, tp_size) for r in range(tp_size)] == senders


def test_tp_size_must_divide_heads(tiny_models: dict[str, Path]) -> None:
    config = ModelConfig.from_pretrained(str(tiny_models["llama"]))  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="must divide the model's 4 attention heads"):
        CausalLM(config, TPGroup(0, 3, pg=NO_COMM))
    with pytest.raises(ValueError, match="process group"):
        TPGroup(0, 2)


def test_tp4_rank_loads_its_query_head_and_replicated_kv_head(
    tiny_models: dict[str, Path],
) -> None:
    # 4 heads, 2 KV heads over 4 ranks: rank 3 holds query head 3, which attends with KV head 1
    path = tiny_models["llama"]
    config = ModelConfig.from_pretrained(str(path))
    qkv = load_model(config, TPGroup(3, 4, pg=NO_COMM)).layers[0].self_attn.qkv_proj.weight
    ref = load_file(path / "model.safetensors")
    d, pre = config.head_dim, "model.layers.0.self_attn"
    assert qkv.shape == (3 * d, config.hidden_size)
    torch.testing.assert_close(qkv[:d], ref[f"{pre}.q_proj.weight"][3 * d : 4 * d])
    torch.testing.assert_close(qkv[d : 2 * d], ref[f"{pre}.k_proj.weight"][d : 2 * d])
    torch.testing.assert_close(qkv[2 * d :], ref[f"{pre}.v_proj.weight"][d : 2 * d])
