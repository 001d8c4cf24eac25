"""pdserve profile: what it measures (the grid), and a --quick run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pdserve.bench.plan.latency_model import prefill_features
from pdserve.bench.plan.placement import kv_blocks, profile_config
from pdserve.bench.plan.profile_model import Profile
from pdserve.bench.profile.cli import format_quality
from pdserve.bench.profile.grid import Grid
from pdserve.cluster.cli import main


def test_grid_stays_within_the_budgets() -> None:
    g = Grid.build(max_tokens=2048, max_len=1024, max_batch=8, max_seqs=16,
                   kv_bytes_per_token=1 << 14, quick=False)  # fmt: skip
    assert all(sum(c) <= 2048 and len(c) <= 12 and max(c) < 1024 for c in g.prefill)
    assert {len(c) for c in g.prefill if len(set(c)) == 1} == {1, 2, 4, 8}
    assert any(len(set(c)) > 1 for c in g.prefill)  # mixed batches pin the Σlen² term apart
    assert max(b for b, _ in g.decode) == 16 and all(c + 10 < 1024 for _, c in g.decode)
    assert {b for b, _ in g.decode} == set(range(1, 17))  # every batch size: the cost is bumpy
    assert {c for b, c in g.decode if b in (3, 5, 7)} == {128}
    assert g.transfer == [16, 64, 256, 1024, 4096]  # 0.25 .. 64 MiB of 16 KiB tokens
    quick = Grid.build(2048, 1024, 8, 16, 1 << 14, quick=True)
    assert quick.repeats == 1 and len(quick.prefill) <= 10 and len(quick.decode) <= 8


@pytest.fixture(scope="module")
def quick_profile(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("profile")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"path": str(tiny_models["llama"]), "device": "cpu"},
        "decode": {"kv_cache": {"memory": "64MiB"}, "max_num_seqs": 16},
        "ray": {"num_threads_per_cpu_worker": 1},
    }))  # fmt: skip
    out = root / "profile.json"
    assert main(["profile", "-f", str(spec), "--quick", "-o", str(out)]) == 0
    return out


def test_quick_profile_of_the_tiny_model_fits_and_saves_everything(quick_profile: Path) -> None:
    data = json.loads(quick_profile.read_text())
    profile = Profile.load(quick_profile)
    assert profile.threads == 1 and profile.device == "cpu"
    config = profile_config(profile)
    assert profile.model.num_layers == 2 and config.decode.max_num_seqs == 16
    per_block = profile.model.kv_bytes_per_token() * 16
    assert kv_blocks(config, profile) == (64 << 20) // per_block
    assert data["hardware"]["cpu_count"] >= 1 and data["spec"]["name"] == "tiny"
    assert data["overheads"]["source"].startswith("default")  # --quick deploys nothing
    raw = data["samples"]
    assert raw["prefill"]["1"] and raw["decode"] and raw["transfer"] and raw["send"]
    for fit in (*profile.prefill.values(), profile.decode):
        assert fit.num_samples >= 4 and fit.r2 <= 1.0 and fit.max_rel_err >= 0
    assert profile.prefill_ms([64]) > 0 and profile.decode_ms(4, 400) > 0
    assert profile.transfer.bandwidth_gbps > 0
    # the prefill fit predicts its own samples (median of one repeat) within its max error
    for sample in raw["prefill"]["1"]:
        predicted = profile.prefill[1].predict(prefill_features(sample["lens"]))
        assert abs(predicted - sample["ms"]) <= profile.prefill[1].max_rel_err * sample["ms"] + 1e-6
    assert "prefill TP1" in format_quality(data)
    if data["hardware"]["cpu_count"] >= 2:  # two workers side by side: the co-run slowdown
        pairs = {f"{a}|{b}" for a in ("decode", "prefill") for b in ("decode", "prefill")}
        assert set(profile.corun_pairs) == pairs and min(profile.corun_pairs.values()) >= 0
        assert profile.corun == pytest.approx(sum(profile.corun_pairs.values()) / 4)


def test_plan_runs_on_a_measured_profile(quick_profile: Path, tmp_path: Path) -> None:
    out = tmp_path / "best.yaml"
    argv = ["plan", "--profile", str(quick_profile), "--devices", "2", "--workload",
            "fixed:in=64,out=8", "--goodput", "ttft:500", "tpot:100", "--num-prompts", "30",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert yaml.safe_load(out.read_text())["name"] == "tiny"
