"""A sweep's files: results.json round-trips, probes.csv has a row per probe, and the plots are
drawn from a hand-written results.json (also through `pdserve sweep --plot-only`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from pdserve.bench.sweep.plots import plot_all
from pdserve.bench.sweep.results import SweepResults, load_results, probes_csv
from pdserve.cluster.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def probe(rate: float, devices: int, att: float, ttft: float | None, tpot: float) -> dict[str, Any]:
    return {
        "rate": rate,
        "rate_per_device": rate / devices,
        "attainment": att,
        "ttft_attainment": ttft,
        "tpot_attainment": tpot,
        "num_requests": 20,
        "failed": 0,
        "duration_s": 20 / rate,
        "breakdown_ms": {
            "queue": 5.0,
            "prefill": 80.0,
            "transfer": 3.0,
            "decode": 900.0,
            "ttft": 100.0,
            "e2e": 1000.0,
            "ttft_other": 15.0,
        },
        "records": f"r{rate}.jsonl",
    }


def placement(
    name: str,
    mode: str,
    p: int,
    d: int,
    probes: list[dict[str, Any]],
    goodput: float,
    saturated: bool = False,
) -> dict[str, Any]:
    devices = p + d
    return {
        "name": name,
        "mode": mode,
        "prefill_instances": p,
        "prefill_tp": 1,
        "decode_instances": d,
        "devices": devices,
        "deploy_spec": {"name": f"sweep-{name}", "mode": mode},
        "workloads": {
            "chat": {
                "goodput": goodput,
                "goodput_per_device": goodput / devices,
                "saturated": saturated,
                "probes": probes,
            }
        },
    }


RESULTS: dict[str, Any] = {
    "experiment": "hand",
    "target": 0.9,
    "device_kind": "cpu",
    "threads_per_device": 1,
    "workloads": [
        {"name": "chat", "workload": "fixed:in=16,out=8", "slos_ms": {"ttft": 500, "tpot": 50}}
    ],
    "placements": [
        placement(
            "co-1",
            "colocated",
            0,
            1,
            [
                probe(4.0, 1, 0.2, 0.5, 0.3),
                probe(1.0, 1, 0.95, 1.0, 0.95),
                probe(2.0, 1, 0.6, 0.9, 0.65),
            ],
            goodput=1.0,
        ),
        placement(
            "1p1d",
            "disaggregated",
            1,
            1,
            [probe(8.0, 2, 0.92, None, 0.92)],
            goodput=8.0,
            saturated=True,
        ),
    ],
    "model": "/models/tiny",
}


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    return tmp_path


def test_results_json_round_trips_unchanged() -> None:
    assert SweepResults.from_json(RESULTS).to_json() == RESULTS


def test_write_gives_results_json_and_a_csv_row_per_probe(tmp_path: Path) -> None:
    SweepResults.from_json(RESULTS).write(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == RESULTS
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "probes.csv").read_text())))
    assert [(r["placement"], float(r["rate"])) for r in rows] == [
        ("co-1", 4.0),
        ("co-1", 1.0),
        ("co-1", 2.0),
        ("1p1d", 8.0),
    ]
    assert rows[3]["ttft_attainment"] == "" and rows[3]["rate_per_device"] == "4.0"
    assert rows[0]["decode_ms"] == "900.0" and rows[0]["records"] == "r4.0.jsonl"
    assert rows[0]["devices"] == "1" and rows[3]["devices"] == "2"


def test_best_probe_is_the_goodput_rate_or_the_lowest_rate() -> None:
    results = SweepResults.from_json(RESULTS)
    co = results.placements[0].workloads["chat"]
    assert co.best_probe() is not None and co.best_probe().rate == 1.0  # type: ignore[union-attr]
    co.goodput = 0.0  # nothing met the target: the lowest rate tried
    assert co.best_probe().rate == 1.0  # type: ignore[union-attr]


def test_csv_of_empty_results_has_only_the_header() -> None:
    empty = SweepResults("e", 0.9, "cpu", 1, [])
    assert probes_csv(empty).count("\n") == 1


def test_plots_from_a_hand_written_results_json(results_dir: Path) -> None:
    paths = plot_all(load_results(results_dir), results_dir)
    names = sorted(p.name for p in paths)
    assert names == ["attainment_chat.png", "goodput_per_device.png", "latency_breakdown.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


def test_plot_only_command(results_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--plot-only", str(results_dir)]) == 0
    assert "attainment_chat.png" in capsys.readouterr().out
    assert (results_dir / "latency_breakdown.png").stat().st_size > 0
    assert main(["sweep", "--plot-only", str(results_dir / "nope")]) == 2


def test_sweep_without_a_file_is_refused() -> None:
    assert main(["sweep"]) == 2
