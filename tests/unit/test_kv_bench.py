"""The KV benchmark moves real KV over a real gloo link between two processes, in every mode,
and its receiver checks that the bytes landed in the paged cache exactly as sent."""

from __future__ import annotations

import pytest

from pdserve.bench.micro.kv_bench import MODES, Shape, run


@pytest.mark.parametrize("scattered", [False, True])  # in place / staged, then scattered
def test_every_mode_moves_the_kv_and_it_lands_as_sent(scattered: bool) -> None:
    shape = Shape(layers=3, kv_heads=2, head_dim=8, block_size=16, scattered=scattered)
    tokens = [5, 40]  # a partial block; several blocks with a partial last one
    results = run(shape, tokens, repeats=1)  # raises if any KV arrived wrong
    assert sorted(results) == tokens
    for n in tokens:
        assert results[n]["bytes"] == n * shape.bytes_per_token()
        assert all(results[n][m] > 0 for m in MODES)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_a_compressed_kv_format_moves_fewer_bytes(kv_dtype: str) -> None:
    """--kv-dtype: codes and a float16 scale per (token, head) row, (8 + 2) / (4 * 8) of the
    float32 bytes, land as sent."""
    shape = Shape(layers=3, kv_heads=2, head_dim=8, block_size=16, kv_dtype=kv_dtype)
    results = run(shape, [40], repeats=1)
    float32 = Shape(layers=3, kv_heads=2, head_dim=8, block_size=16).bytes_per_token()
    assert results[40]["bytes"] == 40 * float32 * 10 // 32
    assert results[40]["quantize_ms"] > 0
