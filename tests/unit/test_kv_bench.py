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
