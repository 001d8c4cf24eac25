"""pdserve plan: placement enumeration, deploy specs that load, ranking, and --compare."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from _sim_profile import make_profile

from pdserve.bench.plan.compare import compare
from pdserve.bench.plan.placement import (
    Placement,
    deploy_spec,
    enumerate_placements,
    kv_blocks,
    placement_of,
)
from pdserve.bench.plan.planner import Ranked, rank
from pdserve.bench.plan.simulator import plan_shapes, simulate
from pdserve.bench.serve.workloads import parse_workload
from pdserve.bench.sweep.bisection import BisectionResult
from pdserve.cluster.cli import main
from pdserve.cluster.config.resolve import settle
from pdserve.cluster.config.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
WORKLOAD = "fixed:in=100,out=10"
SLOS = {"ttft": 200.0, "tpot": 20.0}


def names(placements: list[Placement]) -> list[str]:
    return [p.name for p in placements]


def test_two_devices_give_colocated_and_one_prefill_one_decode() -> None:
    got = enumerate_placements(2)
    assert names(got) == ["colo1", "colo1-chunked", "colo2", "colo2-chunked", "1p1d"]


def test_every_placement_fits_the_devices_and_tp_follows_the_heads() -> None:
    got = enumerate_placements(4, max_tp=4)
    disagg = {(p.prefill_instances, p.prefill_tp, p.decode_instances) for p in got if p.prefill_tp}
    assert {(1, 1, 1), (1, 1, 3), (3, 1, 1), (2, 1, 2), (1, 2, 1), (1, 2, 2)} <= disagg
    assert all(p.devices <= 4 for p in got)
    assert len(got) == 8 + 6 + 2  # colocated x4 (two variants), TP1 pools, TP2 pools
    assert not any(p.prefill_tp == 4 for p in got)  # 4 + a decode replica > 4 devices
    no_tp2 = enumerate_placements(4, max_tp=4, tp_ok=lambda tp: tp != 2)
    assert {p.prefill_tp for p in no_tp2} == {1}


def test_emitted_specs_load_and_describe_the_placement() -> None:
    base = yaml.safe_load((REPO / "deploy" / "local.yaml").read_text())
    base["decode"]["chunked_prefill"] = False  # a colocated-only key: dropped when disaggregated
    for p in enumerate_placements(4, max_tp=2):
        spec = load_spec(deploy_spec(base, p))
        assert placement_of(spec) == p
        assert spec.name == "local" and spec.server.port == 8000  # the rest of the base is kept


def test_settings_follow_the_spec() -> None:
    profile = replace(make_profile(), auto_kv_blocks=77, device="cuda")
    spec = load_spec({"name": "x", "decode": {"kv_cache": {"memory": "1MiB"}, "max_num_seqs": 8}})
    config = settle(spec, profile.device)
    assert kv_blocks(config, profile) == (1 << 20) // (profile.model.kv_bytes_per_token() * 16)
    assert config.decode.max_num_seqs == 8
    colo = load_spec({"name": "x", "mode": "colocated", "decode": {"chunked_prefill": True}})
    config = settle(colo, profile.device)  # auto on a GPU: a memory fraction, as profiled
    assert kv_blocks(config, profile) == 77 and config.decode.chunked_prefill
    assert config.decode.max_num_batched_tokens == 2048  # auto with chunked prefill (vLLM's)
    int8 = settle(
        load_spec({"name": "x", "decode": {"kv_cache": {"memory": "1MiB", "dtype": "int8"}}}), "cpu"
    )
    shape = profile.model  # float32, head_dim 16: a row of 16 int8 values and a 2-byte scale
    per_block = shape.num_layers * 2 * shape.num_kv_heads * (16 + 2) * 16
    assert kv_blocks(int8, profile) == (1 << 20) // per_block


def test_ranking_is_by_goodput_per_device() -> None:
    goodput = {"colo1": 2.0, "colo2": 3.0, "1p1d": 5.0, "1p2d": 5.5}

    def evaluate(p: Placement) -> Ranked:
        return Ranked(p, BisectionResult(goodput[p.name], (), (goodput[p.name], None)))

    placements = [
        Placement.colocated(1), Placement.colocated(2), Placement("disaggregated", 1, 1, 1),
        Placement("disaggregated", 1, 1, 2),
    ]  # fmt: skip
    ranked = rank(placements, evaluate)
    assert [r.placement.name for r in ranked] == ["1p1d", "colo1", "1p2d", "colo2"]
    assert ranked[0].per_device == 2.5


@pytest.fixture
def profile_path(tmp_path: Path) -> Path:
    path = tmp_path / "profile.json"
    make_profile().save(path)
    return path


def test_plan_prints_a_ranking_and_a_deploy_spec_that_loads(
    profile_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "best.yaml"
    argv = ["plan", "--profile", str(profile_path), "--devices", "2", "--workload", WORKLOAD,
            "--goodput", "ttft:200", "tpot:20", "--num-prompts", "40", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "goodput req/s" in printed and "# best:" in printed
    best = load_spec(out)
    assert placement_of(best).devices <= 2
    printed_spec = printed.split("pdserve up -f FILE\n", 1)[1]
    assert yaml.safe_load(printed_spec) == yaml.safe_load(out.read_text())


def test_plan_without_a_workload_says_what_to_pass(
    profile_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--profile", str(profile_path), "--devices", "2"]) == 2
    assert "--workload" in capsys.readouterr().err


def results_json() -> dict[str, Any]:
    spec = deploy_spec(make_profile().spec, Placement("disaggregated", 1, 1, 1))
    probe = {"rate_per_device": 0.0, "ttft_attainment": 1.0, "tpot_attainment": 1.0,
             "failed": 0, "duration_s": 10.0, "breakdown_ms": {}}  # fmt: skip
    probes = [
        probe | {"rate": 2.0, "attainment": 0.95, "num_requests": 30},
        probe | {"rate": 400.0, "attainment": 0.10, "num_requests": 30, "ttft_attainment": 0.2},
    ]
    return {
        "experiment": "hand-written", "target": 0.9, "device_kind": "cpu",
        "threads_per_device": 1, "seed": 3,
        "workloads": [{"name": "short", "workload": WORKLOAD, "slos_ms": SLOS}],
        "placements": [{
            "name": "1p1d", "mode": "disaggregated", "prefill_instances": 1, "prefill_tp": 1,
            "decode_instances": 1, "devices": 2, "deploy_spec": spec,
            "workloads": {"short": {"goodput": 2.0, "goodput_per_device": 1.0,
                                    "saturated": False, "probes": probes}},
        }],
    }  # fmt: skip


def test_compare_simulates_each_probe_with_the_same_requests() -> None:
    profile = make_profile()
    c = compare(profile, results_json())
    assert [(r.placement, r.workload, r.rate) for r in c.rows] == [
        ("1p1d", "short", 2.0),
        ("1p1d", "short", 400.0),
    ]
    workload = parse_workload(WORKLOAD)
    for row in c.rows:  # the same requests: 30 of them, seed 3, at the probe's rate
        planned = plan_shapes(workload, 30, row.rate, 1.0, 3, profile.model.max_model_len)
        expected = simulate(profile, Placement("disaggregated", 1, 1, 1), planned, SLOS)
        assert row.sim == expected.attainment
        assert row.error_pp == pytest.approx(100 * (row.sim - row.real))
    assert c.rows[1].real_by_metric == {"ttft": 0.2, "tpot": 1.0}
    assert c.max_abs_error_pp == max(abs(r.error_pp) for r in c.rows)
    assert c.within_tolerance == (c.max_abs_error_pp <= 10)


def test_compare_from_the_cli_writes_the_table_and_json(
    profile_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, out = tmp_path / "results.json", tmp_path / "compare.json"
    results.write_text(json.dumps(results_json()))
    argv = ["plan", "--profile", str(profile_path), "--compare", str(results),
            "--compare-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "error pp" in printed and "max |error|" in printed
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 2
    assert saved["mean_abs_error_pp"] == pytest.approx(
        sum(abs(r["error_pp"]) for r in saved["rows"]) / 2
    )
