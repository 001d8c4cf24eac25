"""EXPERIMENT.yaml for `pdserve sweep`: the shipped ones load; bad ones name the key and the fix;
device counting; the deploy spec each placement runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve.bench.sweep.experiment import (
    Experiment,
    ExperimentError,
    Placement,
    placement_deploy_spec,
)
from pdserve.bench.sweep.experiment_loader import load_experiment
from pdserve.cluster.config.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "deploy" / "experiments"
# the shared trace sits beside the checkout (../shared), wherever the checkout is cloned
AZURE = (REPO.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv").resolve()

BASE: dict[str, Any] = {
    "name": "t",
    "deploy": {"model": {"device": "cpu"}, "decode": {"kv_cache": {"memory": "64MiB"}}},
    "model": {"bench": "tiny"},
    "placements": [
        {"name": "co-2", "mode": "colocated", "instances": 2},
        {"name": "1p1d", "mode": "disaggregated", "prefill_instances": 1, "decode_instances": 1},
    ],
    "workloads": [
        {
            "name": "short",
            "workload": "fixed:in=16,out=8",
            "slos_ms": {"ttft": 500, "tpot": 50},
            "rate_per_device": {"lo": 1, "hi": 8},
            "num_prompts": 20,
        }
    ],
}


def experiment(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def problems_of(data: dict[str, Any], base_dir: Path | None = None) -> list[str]:
    with pytest.raises(ExperimentError) as info:
        load_experiment(data, base_dir)
    return info.value.problems


def test_a_valid_experiment_with_defaults() -> None:
    e = load_experiment(experiment())
    assert isinstance(e, Experiment)
    assert e.target == 0.9 and e.threads_per_device == 1 and e.warmup_requests == 4
    assert e.output_dir == Path("results/t")
    assert e.model_bench == "tiny" and e.model_path is None
    assert [p.devices for p in e.placements] == [2, 2] and e.max_devices == 2
    (w,) = e.workloads
    assert w.slos_ms == {"ttft": 500.0, "tpot": 50.0}
    assert (w.rate_lo, w.rate_hi, w.num_prompts, w.burstiness) == (1.0, 8.0, 20, 1.0)


@pytest.mark.parametrize(
    ("placement", "devices"),
    [
        (Placement("a", "colocated", 0, 1, 4), 4),
        (Placement("b", "disaggregated", 1, 1, 1), 2),
        (Placement("c", "disaggregated", 2, 1, 1), 3),
        (Placement("d", "disaggregated", 1, 2, 2), 4),
        (Placement("e", "disaggregated", 2, 2, 4), 8),
    ],
)
def test_devices_count_every_actor(placement: Placement, devices: int) -> None:
    assert placement.devices == devices


@pytest.mark.skipif(not AZURE.is_file(), reason="the shared Azure trace is not on this machine")
def test_the_shipped_experiments_load() -> None:
    cpu = load_experiment(EXPERIMENTS / "cpu.yaml")
    assert cpu.max_devices <= 2  # this machine has 2 cores: more would oversubscribe them
    assert any(w.workload.startswith(f"trace:{AZURE}") for w in cpu.workloads)
    gpu = load_experiment(EXPERIMENTS / "gpu-8x.yaml")
    assert gpu.max_devices == 8
    assert {p.mode for p in gpu.placements} == {"colocated", "disaggregated"}
    assert any(p.prefill_tp == 2 for p in gpu.placements)


@pytest.mark.parametrize(
    ("data", "path", "hint"),
    [
        (experiment(placement=[]), "placement", "did you mean 'placements'?"),
        (experiment(bisection={"max_probe": 3}), "bisection.max_probe", "'max_probes'"),
        (experiment(zzz=1), "zzz", "valid keys here: name, deploy, model"),
    ],
)
def test_unknown_keys_are_rejected_with_a_suggestion(
    data: dict[str, Any], path: str, hint: str
) -> None:
    problems = problems_of(data)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: unknown key; "), problems
    assert hint in problems[0]


def test_unknown_key_inside_a_list_item_names_the_item() -> None:
    data = experiment()
    data["placements"][1]["prefill_tensor_parallel"] = 2
    (problem,) = problems_of(data)
    assert problem.startswith("placements.1.prefill_tensor_parallel: unknown key; ")
    assert "prefill_tp" in problem


@pytest.mark.parametrize(
    ("placement", "hint"),
    [
        ({"name": "x", "mode": "colocated", "prefill_instances": 1}, "write only instances: N"),
        ({"name": "x", "mode": "colocated"}, "write only instances: N"),
        ({"name": "x", "mode": "disaggregated", "instances": 2}, "needs prefill_instances"),
        ({"name": "x", "mode": "disaggregated", "prefill_instances": 1}, "decode_instances: N"),
        ({"name": "x", "mode": "split", "instances": 1}, "'colocated' or 'disaggregated'"),
        (
            {
                "name": "x",
                "mode": "disaggregated",
                "prefill_instances": 1,
                "prefill_tp": 3,
                "decode_instances": 1,
            },
            "power of two",
        ),
        ({"name": "X Y", "mode": "colocated", "instances": 1}, "a-z, 0-9"),
    ],
)
def test_bad_placements_say_what_to_write(placement: dict[str, Any], hint: str) -> None:
    (problem,) = problems_of(experiment(placements=[placement]))
    assert problem.startswith("placements.0"), problem
    assert hint in problem, problem


@pytest.mark.parametrize(
    ("change", "path", "hint"),
    [
        ({"slos_ms": {}}, "workloads.0.slos_ms", "at least one of ttft"),
        ({"rate_per_device": {"lo": 4, "hi": 2}}, "workloads.0.rate_per_device", "lo must be"),
        ({"num_prompts": "20"}, "workloads.0.num_prompts", "without quotes"),
        ({"workload": "fixd:in=1,out=1"}, "workloads.0.workload", "unknown kind"),
    ],
)
def test_bad_workloads_name_the_key(change: dict[str, Any], path: str, hint: str) -> None:
    data = experiment()
    data["workloads"][0].update(change)
    (problem,) = problems_of(data)
    assert problem.startswith(f"{path}: ") and hint in problem, problem


def test_names_must_differ() -> None:
    data = experiment()
    data["placements"][1]["name"] = "co-2"
    (problem,) = problems_of(data)
    assert "co-2 appears twice" in problem


def test_trace_paths_are_relative_to_the_experiment_and_must_exist(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    trace = tmp_path / "traces" / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,5\n1,20,6\n")
    data = experiment()
    data["workloads"][0]["workload"] = "trace:traces/t.csv,timestamps=false,scale=0.5"
    e = load_experiment(data, base_dir=tmp_path)
    assert e.workloads[0].workload == f"trace:{trace},timestamps=false,scale=0.5"

    data["workloads"][0]["workload"] = "trace:traces/missing.csv,timestamps=false"
    (problem,) = problems_of(data, tmp_path)
    assert problem.startswith("workloads.0.workload: trace file ") and "not found" in problem

    data["workloads"][0]["workload"] = "trace:traces/t.csv"
    (problem,) = problems_of(data, tmp_path)
    assert "add ,timestamps=false" in problem


def test_file_paths_resolve_from_the_experiments_folder(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"model": {"device": "cpu"}}))
    data = experiment(deploy="spec.yaml", model={"path": "models/m"}, output_dir="out")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    e = load_experiment(path)
    assert e.base_deploy == {"model": {"device": "cpu"}}
    assert e.model_path == str(tmp_path / "models" / "m")
    assert e.output_dir == Path("out")  # like --output: relative to where sweep runs

    data["deploy"] = "nope.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ExperimentError, match="no such file"):
        load_experiment(path)


def test_model_needs_exactly_one_source() -> None:
    (problem,) = problems_of(experiment(model={"bench": "small", "path": "/m"}))
    assert problem.startswith("model: give exactly one of bench")
    (problem,) = problems_of(experiment(model={"bench": "large"}))
    assert problem.startswith("model.bench: ") and "'tiny' or 'small'" in problem


def test_base_spec_problems_are_reported_per_placement() -> None:
    data = experiment(deploy={"model": {"device": "cpu"}, "decode": {"max_num_seq": 4}})
    problems = problems_of(data)
    assert len(problems) == 2
    assert problems[0].startswith("placements.0 (co-2): deploy spec: decode.max_num_seq")


def test_custom_resources_are_refused() -> None:
    data = experiment(deploy={"prefill": {"resources": {"prefill": 1}}})
    (problem,) = problems_of(data)
    assert problem.startswith("deploy.prefill.resources: ") and "remove resources" in problem


def test_placement_deploy_spec_sets_pools_model_threads_and_port() -> None:
    base = {
        "mode": "disaggregated",
        "prefill": {"max_batch_tokens": 4096},
        "model": {"device": "cpu"},
    }
    tp2 = Placement("tp2-2d", "disaggregated", 1, 2, 2)
    spec = placement_deploy_spec(base, tp2, model_path="/m", threads=2, port=9123)
    assert spec["name"] == "sweep-tp2-2d"
    assert spec["prefill"] == {"max_batch_tokens": 4096, "instances": 1, "tensor_parallel_size": 2}
    assert spec["decode"] == {"instances": 2}
    assert spec["model"] == {"device": "cpu", "path": "/m"}
    assert spec["ray"] == {"num_threads_per_cpu_worker": 2} and spec["server"] == {"port": 9123}
    load_spec(spec)

    colocated = placement_deploy_spec(
        base, Placement("co-4", "colocated", 0, 1, 4), model_path=None, threads=1, port=9124
    )
    assert "prefill" not in colocated and colocated["mode"] == "colocated"
    assert colocated["decode"] == {"instances": 4} and colocated["model"] == {"device": "cpu"}
    resolved = load_spec(colocated)
    assert resolved.mode == "colocated" and resolved.decode.instances == 4
    assert base["prefill"] == {"max_batch_tokens": 4096}  # the base is left alone


def test_narrowed_keeps_the_named_parts() -> None:
    e = load_experiment(experiment())
    cut = e.narrowed(placements=["1p1d"], num_prompts=5, max_probes=2)
    assert [p.name for p in cut.placements] == ["1p1d"]
    assert cut.workloads[0].num_prompts == 5 and cut.max_probes == 2
    with pytest.raises(ExperimentError, match="--placements: unknown 2p1d; choose from co-2, 1p1d"):
        e.narrowed(placements=["2p1d"])


def test_min_duration_adds_requests_at_high_rates_only() -> None:
    data = experiment()
    data["workloads"][0]["min_duration_s"] = 10
    (w,) = load_experiment(data).workloads
    assert w.num_requests(0.5) == 20  # 20 prompts already last 40 s
    assert w.num_requests(4.0) == 40  # 10 s at 4 req/s
    assert w.num_requests(4.01) == 41
    (default,) = load_experiment(experiment()).workloads
    assert default.min_duration_s == 0 and default.num_requests(100.0) == 20
