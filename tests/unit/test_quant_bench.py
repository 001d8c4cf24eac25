"""The quantization benchmark on the tiny model: every setting and both transformers baselines
timed at every batch size, and the memory each setting takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.micro.quant_bench import main, parse_args


def test_every_setting_and_baseline_is_timed_and_sized(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "q.json"
    argv = [
        "--model", str(tiny_models["llama"]), "--batch-sizes", "1,2", "--prefill-batch-sizes",
        "2", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "1", "--warmup", "0",
        "--settings", "float32;float32,quantization=int8;bfloat16,kv=int8", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    engines = ["float32", "float32,quantization=int8", "bfloat16,kv=int8"]
    engines += ["transformers float32", "transformers bfloat16"]
    timed = {(s["engine"], s["phase"], s["batch"]) for s in result["series"]}
    assert timed == {
        (e, p, b) for e in engines for p, b in [("decode", 1), ("decode", 2), ("prefill", 2)]
    }
    for s in result["series"]:  # decode: every token after the first; prefill: every prompt token
        per_run = s["batch"] * (2 if s["phase"] == "decode" else 8)
        assert s["tokens"] == [per_run] and s["median"] > 0
    mem = result["memory"]
    assert mem["float32,quantization=int8"]["weight_bytes"] < mem["float32"]["weight_bytes"]
    same = mem["transformers float32"]["weight_bytes"]  # its buffers differ by a few bytes
    assert mem["float32"]["weight_bytes"] == pytest.approx(same, rel=0.01)
    # int8 rows carry a 2-byte scale per (token, head): more than a quarter of float32's
    assert mem["float32"]["kv_bytes_per_token"] / 4 < mem["bfloat16,kv=int8"]["kv_bytes_per_token"]
    assert mem["bfloat16,kv=int8"]["kv_bytes_per_token"] < mem["float32"]["kv_bytes_per_token"] / 2


def test_a_bad_setting_names_the_fix() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--settings", "float32,quant=int8"])
