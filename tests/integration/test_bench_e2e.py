"""`pdserve bench` and `pdserve sweep` against real local deployments of the tiny model."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from cluster_helpers import deploy_spec
from rich.console import Console

from pdserve.bench.serve.runner import (
    CHAT,
    BenchConfig,
    BenchResult,
    plan_requests,
    run_benchmark,
)
from pdserve.bench.serve.tokens import find_tokens
from pdserve.bench.serve.workloads import parse_workload
from pdserve.bench.sweep.experiment_loader import load_experiment
from pdserve.bench.sweep.phase_metrics import PhaseTotals
from pdserve.bench.sweep.plots import plot_all
from pdserve.bench.sweep.probe import scrape_phases
from pdserve.bench.sweep.runner import run_sweep
from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.spec import load_spec
from pdserve.cluster.launch.controller import find_controller, launch
from pdserve.engine.tiny_model import default_tiny_model

pytestmark = pytest.mark.integration

SLOS = {"ttft": 3000.0, "tpot": 300.0}


@pytest.fixture(scope="module")
def served(ray_session: None) -> Iterator[tuple[Any, str]]:
    spec = deploy_spec("deploy/local.yaml", "itest-bench", default_tiny_model())
    actor, url = launch(resolve(load_spec(spec), gpus_available=False), detached=False)
    yield actor, url
    ray.get(actor.shutdown.remote(), timeout=120)
    ray.kill(actor)


async def bench_with_phases(config: BenchConfig) -> tuple[BenchResult, PhaseTotals]:
    async with httpx.AsyncClient() as client:
        before = await scrape_phases(client, config.base_url)
        result = await run_benchmark(config)
        after = await scrape_phases(client, config.base_url)
    return result, after.minus(before)


def test_benchmark_against_1p1d(served: tuple[Any, str]) -> None:
    _, url = served
    config = BenchConfig(
        base_url=url,
        workload="uniform:in=4-64,out=2-12",
        request_rate=40.0,
        num_prompts=24,
        goodput_ms=SLOS,
        seed=3,
        show_progress=False,
    )
    result, phases = asyncio.run(bench_with_phases(config))
    records, s = result.records, result.summary
    assert all(r.success for r in records), [r.error for r in records if not r.success][:3]
    planned = plan_requests(
        replace(config, max_model_len=result.result["max_model_len"]),
        parse_workload(str(config.workload)),
    )
    assert [r.output_tokens for r in records] == [p.output_len for p in planned]
    assert [r.input_len for r in records] == [p.input_len for p in planned]
    assert all(0 < r.ttft_s <= r.e2el_s and len(r.itl_s) <= r.output_tokens - 1 for r in records)

    met = [r.meets(SLOS) for r in records]
    good = sum(all(m.values()) for m in met)
    assert (s.completed, s.failed) == (24, 0)
    assert s.slo_attainment == pytest.approx(good / 24)
    assert s.request_goodput == pytest.approx(good / s.duration_s)
    for name in SLOS:
        assert s.slo_attainment_by_metric[name] == pytest.approx(sum(m[name] for m in met) / 24)
    assert result.result["slo_attainment"] == s.slo_attainment
    assert s.total_output == sum(p.output_len for p in planned)

    # the server saw the same requests: its phase histograms moved by exactly 24
    assert phases.finished == 24
    breakdown = phases.breakdown_ms()
    assert breakdown["prefill"] > 0 and breakdown["transfer"] > 0 and breakdown["decode"] > 0
    assert breakdown["ttft"] <= breakdown["e2e"]


def test_chat_workload_on_the_chat_endpoint_with_sampling(served: tuple[Any, str]) -> None:
    """Real text as one user message, sized with the model's tokenizer through its chat
    template: the server counts exactly the planned prompt tokens; sampled, not greedy."""
    _, url = served
    tokenizer = str(default_tiny_model())
    config = BenchConfig(
        base_url=url, endpoint=CHAT, workload="chat:in=40-120,out=4-8", num_prompts=6,
        request_rate=20.0, seed=5, temperature=0.8, top_k=20, tokenizer=tokenizer,
        show_progress=False,
    )  # fmt: skip
    result = asyncio.run(run_benchmark(config))
    records = result.records
    assert all(r.success for r in records), [r.error for r in records if not r.success][:3]
    planned = plan_requests(
        replace(
            config, model=result.result["model_id"], max_model_len=result.result["max_model_len"]
        ),
        parse_workload("chat:in=40-120,out=4-8"),
        find_tokens(tokenizer, "tiny", chat=True),
    )
    assert all(isinstance(p.prompt, str) for p in planned)
    assert [r.input_len for r in records] == [p.input_len for p in planned]  # the server's count
    assert all(40 - 3 <= r.input_len <= 120 for r in records)
    assert [r.output_tokens for r in records] == [p.output_len for p in planned]
    assert all(0 < r.ttft_s <= r.e2el_s and len(r.itl_s) <= r.output_tokens - 1 for r in records)
    assert result.result["sampling_params"]["temperature"] == 0.8
    assert result.result["tokenizer"] == tokenizer


def test_short_sweep_writes_results_records_and_plots(ray_session: None, tmp_path: Path) -> None:
    experiment = load_experiment(
        {
            "name": "itest-sweep",
            "model": {"bench": "tiny"},
            "deploy": {"model": {"device": "cpu"}, "decode": {"kv_cache": {"memory": "64MiB"}}},
            "placements": [{"name": "co-1", "mode": "colocated", "instances": 1}],
            "workloads": [
                {  # met at the top of the range: one probe, a lower bound
                    "name": "easy",
                    "workload": "fixed:in=16,out=6",
                    "slos_ms": SLOS,
                    "rate_per_device": {"lo": 2, "hi": 8},
                    "num_prompts": 8,
                },
                {  # nobody answers in 10 us: the top fails, then the bottom, goodput 0
                    "name": "impossible",
                    "workload": "fixed:in=16,out=6",
                    "slos_ms": {"ttft": 0.01},
                    "rate_per_device": {"lo": 4, "hi": 8},
                    "num_prompts": 6,
                },
            ],
            "warmup_requests": 2,
        }
    )
    results = run_sweep(experiment, tmp_path, Console(file=io.StringIO()))
    assert find_controller("pdserve-sweep-co-1") is None  # torn down

    data = json.loads((tmp_path / "results.json").read_text())
    assert data == results.to_json()
    assert (data["experiment"], data["target"], data["device_kind"]) == ("itest-sweep", 0.9, "cpu")
    (placement,) = data["placements"]
    assert placement["devices"] == 1 and placement["deploy_spec"]["mode"] == "colocated"
    easy, impossible = placement["workloads"]["easy"], placement["workloads"]["impossible"]
    assert (easy["goodput"], easy["saturated"], len(easy["probes"])) == (8.0, True, 1)
    (probe,) = easy["probes"]
    assert probe["attainment"] == 1.0 and probe["failed"] == 0 and probe["num_requests"] == 8
    assert probe["server_finished"] == 8 and probe["breakdown_ms"]["decode"] > 0
    assert (impossible["goodput"], impossible["saturated"]) == (0.0, False)
    assert [p["rate"] for p in impossible["probes"]] == [8.0, 4.0]
    assert all(
        p["ttft_attainment"] == 0.0 and p["tpot_attainment"] is None for p in impossible["probes"]
    )

    rows = list(csv.DictReader((tmp_path / "probes.csv").open()))
    assert [r["workload"] for r in rows] == ["easy", "impossible", "impossible"]
    for row in rows:
        lines = (tmp_path / "records" / row["records"]).read_text().splitlines()
        assert len(lines) == int(row["num_requests"])
    for path in plot_all(results, tmp_path):
        assert path.stat().st_size > 5000
