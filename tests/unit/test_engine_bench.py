"""The engine benchmark runs end to end at minimal sizes and compares like with like: both sides
generate the same tokens from the same model, and tokens/s follow the stated definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _gguf_files import write_tiny_gguf

from pdserve.bench.micro import engine_timers as timers
from pdserve.bench.micro.engine_bench import main, parse_args
from pdserve.bench.models import (
    BenchModelSpec,
    load_hf,
    load_pdserve,
    make_bench_model,
    num_params,
    resolve_model,
)

BATCH, PROMPT_LEN, NEW = 3, 20, 5


@pytest.fixture(scope="module")
def report(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("engine-bench") / "engine.json"
    argv = [
        "--model", str(tiny_models["llama"]), "--batch-sizes", f"1,{BATCH}",
        "--prompt-len", str(PROMPT_LEN), "--new-tokens", str(NEW),
        "--repeats", "2", "--warmup", "0", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_every_phase_is_compared_at_every_batch_size(report: dict) -> None:
    got = {(r["phase"], r["batch"], r["baseline"]) for r in report["rows"]}
    for b in (1, BATCH):
        assert {
            ("decode", b, "generate"),
            ("decode", b, "generate_batch"),
            ("prefill", b, "forward"),
            ("prefill + KV send", b, "forward"),
            ("decode sampled", b, "pdserve greedy"),
            ("decode sampled", b, "generate sampled"),
        } <= got
    for row in report["rows"]:
        assert row["pdserve_tok_s"] > 0 and row["baseline_tok_s"] > 0
        assert row["ratio"] == pytest.approx(row["pdserve_tok_s"] / row["baseline_tok_s"])
    prefill_targets = {r["target"] for r in report["rows"] if r["phase"] == "prefill"}
    assert prefill_targets == {0.95}
    sampled_targets = {
        r["batch"]: r["target"] for r in report["rows"] if r["baseline"] == "pdserve greedy"
    }
    assert sampled_targets == {1: 0.95, BATCH: None}  # the target is set at B = 1 and 32


def test_decode_counts_tokens_after_the_first_and_matches_transformers(report: dict) -> None:
    decode = {(s["engine"], s["batch"]): s for s in report["series"] if s["phase"] == "decode"}
    for b in (1, BATCH):
        for engine in ("pdserve", "generate", "generate_batch", "pdserve sampled"):
            # B * (new_tokens - 1): the prefill's token is not a decode token
            assert decode[engine, b]["tokens"] == [b * (NEW - 1)] * 2
        # greedy float32 on the same weights: the same tokens, so the same work was timed
        assert decode["generate", b]["same_outputs"] == f"{b}/{b}"


def test_prefill_counts_every_prompt_token(report: dict) -> None:
    for s in report["series"]:
        if s["phase"] == "prefill":
            assert s["tokens"] == [s["batch"] * PROMPT_LEN] * 2
            assert all(r > 0 for r in s["rates"])


def test_sampled_decode_is_reproducible_and_differs_from_greedy(
    tiny_models: dict[str, Path],
) -> None:
    model = load_pdserve(tiny_models["llama"])
    prompts = timers.make_prompts(4, PROMPT_LEN, model.config.vocab_size, seed=0)
    runs = [timers.pdserve_decode(model, prompts, 12, 16, sample=True).outputs for _ in range(2)]
    greedy = timers.pdserve_decode(model, prompts, 12, 16, sample=False).outputs
    assert runs[0] == runs[1], "seeded per request: every run draws the same tokens"
    assert runs[0] != greedy


def test_model_names_and_gguf_files_resolve_to_one_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "t.gguf", "llama")
    converted = resolve_model(str(gguf))
    assert (converted / "config.json").is_file() and converted != gguf
    assert resolve_model(str(gguf)) == converted  # converted once, then reused
    assert resolve_model("builtin:tiny-llama") == resolve_model("tiny")
    for dtype in ("float32", "bfloat16"):
        ours, theirs = load_pdserve(converted, dtype), load_hf(converted, dtype)
        assert ours.embed_tokens.dtype == theirs.model.embed_tokens.weight.dtype
        torch.testing.assert_close(ours.embed_tokens, theirs.model.embed_tokens.weight)


def test_bench_model_is_built_once_and_both_sides_load_the_same_weights(tmp_path: Path) -> None:
    spec = BenchModelSpec(
        hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
        vocab_size=64, max_position_embeddings=128,
    )  # fmt: skip
    path = make_bench_model(tmp_path / "m", spec)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert make_bench_model(tmp_path / "m", spec) == path
    assert weights.stat().st_mtime_ns == stamp  # reused, not rebuilt
    ours, theirs = load_pdserve(path), load_hf(path)
    assert num_params(ours) == num_params(theirs)
    torch.testing.assert_close(ours.embed_tokens, theirs.model.embed_tokens.weight)


def test_bad_arguments_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny, small, smollm2, builtin:<name>, a local"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown built-in model"):
        resolve_model("builtin:nothing")
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "float16"])
    with pytest.raises(SystemExit):
        parse_args(["--batch-sizes", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--new-tokens", "1"])
