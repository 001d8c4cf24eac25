"""`pdserve eval-ppl`'s parts: settings parse with errors that name the fix, perplexity through
the paged cache equals a plain forward's, agreement counts token prefixes."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pdserve.bench.model_settings import Setting, parse_setting
from pdserve.bench.quality.agreement import agreement
from pdserve.bench.quality.ppl import BLOCK_SIZE, perplexity
from pdserve.engine.attention import PrefillMetadata
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup


def test_settings_parse_and_name_their_bounds() -> None:
    assert parse_setting("bfloat16") == Setting("bfloat16")
    s = parse_setting("float32,quantization=int4,kv=int8")
    assert (s.quantization, s.kv, s.bound) == ("int4", "int8", 0.10)
    assert parse_setting("float32,kv=fp8_e4m3").bound == 0.02
    assert Setting("bfloat16").bound is None and s.label == "float32,quantization=int4,kv=int8"
    with pytest.raises(argparse.ArgumentTypeError, match="choose one of"):
        parse_setting("float32,kv=int3")
    with pytest.raises(argparse.ArgumentTypeError, match="quantization=Q or kv=KV"):
        parse_setting("float32,int8")


def _reference_nll(model: torch.nn.Module, ids: list[int], window: int, stride: int) -> float:
    """Mean NLL of the same strided windows, each run as one plain prefill forward."""
    nll, n, done = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        seq = ids[begin : begin + window]
        first = max(done - begin, 0) + 1
        hidden = model(torch.tensor(seq), torch.arange(len(seq)), PrefillMetadata([len(seq)]))
        logprobs = F.log_softmax(model.compute_logits(hidden)[first - 1 : len(seq) - 1], -1)
        targets = torch.tensor(seq[first:])
        nll -= float(logprobs.gather(1, targets[:, None]).sum())
        n, done = n + len(targets), begin + len(seq) - 1
        if begin + window >= len(ids):
            break
    return nll / n


def test_perplexity_through_the_paged_cache_equals_a_plain_forward(
    tiny_models: dict[str, Path],
) -> None:
    config = ModelConfig.from_pretrained(str(tiny_models["llama"]))
    model = load_model(config, TPGroup.single())
    ids = torch.randint(8, config.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    cache = allocate_kv_cache(config, 1, 8, BLOCK_SIZE, "cpu")
    result = perplexity(model, cache, ids.tolist(), window=128, stride=48)
    assert result.tokens == 299  # every token but the first, once
    expected = _reference_nll(model, ids.tolist(), window=128, stride=48)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-4)


def test_agreement_counts_common_prefixes() -> None:
    a = agreement([[1, 2, 3], [4, 5], [6]], [[1, 2, 9], [4, 5], [7, 8]])
    assert (a.prompts, a.identical, a.agreed_tokens, a.reference_tokens) == (3, 1, 4, 6)
    assert a.token_share == pytest.approx(4 / 6)


def test_eval_ppl_prints_each_settings_answers(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole command on the tiny model: a table row per setting, the reference agrees with
    itself, and --show-answers prints the first answers under each setting."""
    from pdserve.bench.quality.cli import add_args, run

    p = argparse.ArgumentParser()
    add_args(p)
    out = tmp_path / "eval.json"
    args = p.parse_args([
        "--model", str(tiny_models["llama"]), "--setting", "float32", "--setting",
        "float32,kv=int8", "--window", "64", "--stride", "32", "--max-tokens", "4",
        "--show-answers", "2", "--out", str(out),
    ])  # fmt: skip
    assert run(args) == 0
    text = capsys.readouterr().out
    assert "What is the capital of France?  ->" in text and "Name three primary colors." in text
    assert text.count("What is the capital of France?  ->") == 2  # once per setting
    rows = json.loads(out.read_text())
    assert rows[0]["agreement"]["identical"] == 20 and len(rows[1]["answers"]) == 20
