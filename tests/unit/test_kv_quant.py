"""A compressed KV cache: rows round-trip within their format's bound, attention over it stays
within the error that bound allows, and a cache sized in bytes holds proportionally more blocks."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from pdserve.engine.attention import (
    DecodeMetadata,
    MixedMetadata,
    decode_attention,
    mixed_attention,
    plan_decode,
    plan_mixed,
    write_kv,
)
from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import KVCacheSize
from pdserve.engine.kv_cache import allocate_kv_cache, bytes_per_block, kv_rows
from pdserve.engine.kv_format import row_bytes
from pdserve.engine.kv_quant import TORCH_DTYPES, from_cache_rows, to_cache_rows

FORMATS = ("int8", "fp8_e4m3", "bfloat16", "float16", "float32")
D = 32  # head_dim


def error_bound(x: torch.Tensor, name: str) -> torch.Tensor:
    """Per value, the most a round trip through format ``name`` may move x: [..., D]."""
    absmax = x.abs().amax(-1, keepdim=True)
    slack = 1 + 2**-10  # the float16 scale's rounding
    if name == "int8":  # half a step of absmax / 127
        return (absmax / 254 * slack).expand_as(x)
    if name == "fp8_e4m3":  # 3 mantissa bits: 2**-4 relative; subnormals: half of 2**-9 * s
        return x.abs() * 2**-4 + absmax / 448 * 2**-10 * slack
    mantissa = {"bfloat16": 7, "float16": 10, "float32": 23}[name]
    subnormal = 2**-25 if name == "float16" else 0.0  # half of float16's smallest step
    return x.abs() * 2.0 ** -(mantissa + 1) + subnormal


def rows_of_every_size(g: torch.Generator) -> torch.Tensor:
    """[40, 3, D]: rows with absmax from 1e-3 to 1e2, one all zero, one with a single outlier."""
    x = torch.randn(40, 3, D, generator=g) * torch.logspace(-3, 2, 40)[:, None, None]
    x[5, 1] = 0
    x[7, 2, 3] = 300.0
    return x


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_stays_within_the_format_bound(name: str) -> None:
    x = rows_of_every_size(torch.Generator().manual_seed(0))
    rows = to_cache_rows(x, TORCH_DTYPES[name])
    assert rows.shape[-1] * rows.element_size() == row_bytes(name, D)
    back = from_cache_rows(rows, torch.float32)
    assert back.shape == x.shape and torch.isfinite(back).all()
    assert (back - x).abs().le(error_bound(x, name) + 1e-30).all()
    assert not back[5, 1].any()  # an all-zero row comes back zero (no 0/0)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_a_row_quantizes_the_same_alone_strided_or_in_a_batch(name: str) -> None:
    """Incremental writes are exact: a token's bytes depend on its own row only, so a decode
    step, a local prefill and a prefill rank's wire all store the same bytes."""
    dtype = TORCH_DTYPES[name]
    qkv = torch.randn(9, 3, 2, D)  # [T, q/k/v, heads, D]: k is a strided view, as the hook's
    k = qkv[:, 1]
    batch = to_cache_rows(k, dtype).view(torch.uint8)
    one_by_one = torch.cat([to_cache_rows(k[i : i + 1].clone(), dtype) for i in range(9)])
    assert torch.equal(batch, one_by_one.view(torch.uint8))


def fill(cache: torch.Tensor, kv: torch.Tensor, tables: list[list[int]], bs: int) -> None:
    """Write kv [2, B, L, h, D] (sequence b's first len positions) into cache by block table."""
    for b, table in enumerate(tables):
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(kv.shape[2])])
        write_kv(cache, kv[0, b], kv[1, b], kv_rows(slots, bs))


def attention_bound(q: torch.Tensor, kv: torch.Tensor, name: str, scale: float) -> float:
    """Most any output may move when every K and V value moves by at most its format bound:
    V's error, plus logits moved by at most delta (so each softmax weight by a factor within
    e**(+-2 delta)) reweighting values no larger than max |v|."""
    eps_k = float(error_bound(kv[0], name).max())
    eps_v = float(error_bound(kv[1], name).max())
    delta = scale * float(q.abs().sum(-1).max()) * eps_k
    return eps_v + math.expm1(2 * delta) * (float(kv[1].abs().max()) + eps_v)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "bfloat16"])
def test_decode_attention_over_a_compressed_cache_is_close_to_float(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    bs, heads, kv_heads, ctx = 4, 4, 2, 11
    tables = [[5, 0, 7], [2, 6, 1]]  # scattered blocks, ctx 11 and 9 tokens
    kv = torch.randn(2, 2, ctx, kv_heads, D, generator=g)
    q = torch.randn(2, heads, D, generator=g)
    meta = DecodeMetadata(torch.tensor(tables), torch.tensor([ctx, 9]), torch.tensor([0, 0]))
    plan = plan_decode(meta, bs, None)
    out = {}
    for fmt in ("float32", name):
        cache = allocate_kv_cache_like(8, bs, kv_heads, fmt)
        fill(cache, kv, tables, bs)
        out[fmt] = decode_attention(q, cache, plan, D**-0.5)
    assert out[name].dtype == torch.float32  # computed in the model's dtype, whatever is stored
    err = float((out[name] - out["float32"]).abs().max())
    assert err <= attention_bound(q, kv, name, D**-0.5)
    assert err > 0  # the compressed cache really is another format


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_a_later_chunk_attends_over_the_compressed_cache(name: str) -> None:
    """Chunked prefill: a chunk at position 8 writes its K/V, then attends over positions 0..11
    gathered (dequantized) from the cache."""
    g = torch.Generator().manual_seed(2)
    bs, heads, kv_heads, table = 4, 2, 2, [3, 1, 4]
    kv = torch.randn(2, 1, 12, kv_heads, D, generator=g)
    q = torch.randn(4, heads, D, generator=g)
    meta = MixedMetadata(None, [8], [4], [table], torch.tensor([4 * 4 + p for p in range(4)]))
    out = {}
    for fmt in ("float32", name):
        cache = allocate_kv_cache_like(5, bs, kv_heads, fmt)
        fill(cache, kv[:, :, :8], [table], bs)
        plan = plan_mixed(meta, bs, None)
        out[fmt] = mixed_attention(q, kv[0, 0, 8:], kv[1, 0, 8:], cache, plan, D**-0.5, None)
    err = float((out[name] - out["float32"]).abs().max())
    assert 0 < err <= attention_bound(q, kv, name, D**-0.5)


def allocate_kv_cache_like(blocks: int, bs: int, kv_heads: int, name: str) -> torch.Tensor:
    """One layer of a cache in format ``name`` for a float32 model: [blocks, 2, bs, h, row]."""
    config = _config(num_layers=1, num_kv_heads=kv_heads, num_heads=kv_heads, head_dim=D)
    return allocate_kv_cache(config, 1, blocks, bs, "cpu", name)[0]


def _config(**shape: int) -> ModelConfig:
    base = ModelConfig(
        path="", architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8, num_layers=1,
        num_heads=1, num_kv_heads=1, head_dim=D, intermediate_size=8, rms_norm_eps=1e-6,
        rope_theta=1e4, rope_scaling=None, max_position_embeddings=64, max_model_len=64,
        tie_word_embeddings=True, qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False,
        sliding_window=None, eos_token_ids=(), bos_token_id=None, dtype=torch.float32,
    )  # fmt: skip
    return dataclasses.replace(base, **shape)


def test_smollm2_bytes_per_token() -> None:
    """SmolLM2-135M's KV shape (30 layers, 3 KV heads, head_dim 64): a scaled byte format
    stores 66 bytes a row against 256 in float32, 3.88x less."""
    config = _config(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    per_token = {n: bytes_per_block(config, 1, 1, n) for n in ("auto", *FORMATS)}
    assert per_token == {
        "auto": 46080, "float32": 46080, "bfloat16": 23040, "float16": 23040,
        "fp8_e4m3": 11880, "int8": 11880,
    }  # fmt: skip


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "bfloat16"])
def test_a_cache_sized_in_bytes_holds_proportionally_more_blocks(
    tiny_models: dict[str, Path], name: str
) -> None:
    config = ModelConfig.from_pretrained(str(tiny_models["llama"]), dtype="float32")
    d = config.head_dim
    full, small = bytes_per_block(config, 1, 16), bytes_per_block(config, 1, 16, name)
    factor = {"int8": (d + 2) / (4 * d), "fp8_e4m3": (d + 2) / (4 * d), "bfloat16": 0.5}[name]
    assert small == full * factor
    size = KVCacheSize(memory_bytes=64 * full)
    assert size.num_blocks(small) == int(64 / factor)
    cache = allocate_kv_cache(config, 1, size.num_blocks(small), 16, "cpu", name)
    assert cache.numel() * cache.element_size() <= 64 * full  # the budget holds, scales and all
    assert cache.dtype == TORCH_DTYPES[name]
