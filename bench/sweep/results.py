"""What a sweep measured, and its files: results.json (the contract other tools read), probes.csv.

results.json::

    {"experiment", "target", "device_kind": "cpu" | "cuda", "threads_per_device",
     "workloads": [{"name", "workload", "slos_ms"}],
     "placements": [{"name", "mode", "prefill_instances", "prefill_tp", "decode_instances",
                     "devices", "deploy_spec",
                     "workloads": {NAME: {"goodput", "goodput_per_device", "saturated",
                                          "probes": [{"rate", "rate_per_device", "attainment",
                                                      "ttft_attainment", "tpot_attainment",
                                                      "num_requests", "failed", "duration_s",
                                                      "breakdown_ms": {...}, ...}]}}}]}

`goodput` is the highest probed rate (req/s, whole placement) whose SLO attainment met the
target; `saturated` says the top of the range met it, so the goodput is a lower bound.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
PROBES_FILE = "probes.csv"
PROBE_KEYS = (
    "rate",
    "rate_per_device",
    "attainment",
    "ttft_attainment",
    "tpot_attainment",
    "num_requests",
    "failed",
    "duration_s",
)
CSV_BREAKDOWN = ("queue", "prefill", "transfer", "decode", "ttft", "e2e")


@dataclass(frozen=True)
class ProbeResult:
    """One benchmark run at one rate. Attainments are shares of requests sent, 0..1; an SLO the
    workload does not set has attainment None."""

    rate: float  # req/s offered to the whole placement
    rate_per_device: float
    attainment: float  # every SLO met
    ttft_attainment: float | None
    tpot_attainment: float | None
    num_requests: int
    failed: int
    duration_s: float
    breakdown_ms: Mapping[str, float]  # bench.sweep.phase_metrics keys
    extra: Mapping[str, Any] = field(default_factory=dict)  # latency stats, records file

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in PROBE_KEYS}
        return {**out, "breakdown_ms": dict(self.breakdown_ms), **self.extra}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ProbeResult:
        extra = {k: v for k, v in d.items() if k not in (*PROBE_KEYS, "breakdown_ms")}
        return cls(
            rate=float(d["rate"]),
            rate_per_device=float(d["rate_per_device"]),
            attainment=float(d["attainment"]),
            ttft_attainment=_float_or_none(d.get("ttft_attainment")),
            tpot_attainment=_float_or_none(d.get("tpot_attainment")),
            num_requests=int(d["num_requests"]),
            failed=int(d["failed"]),
            duration_s=float(d["duration_s"]),
            breakdown_ms={k: float(v) for k, v in d["breakdown_ms"].items()},
            extra=extra,
        )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass
class WorkloadResult:
    """One placement on one workload: its probes in the order run, and the answer."""

    probes: list[ProbeResult] = field(default_factory=list)
    goodput: float = 0.0  # req/s, whole placement
    saturated: bool = False

    def best_probe(self) -> ProbeResult | None:
        """The probe at the goodput rate; without one, the lowest rate probed."""
        at = [p for p in self.probes if p.rate == self.goodput]
        if at:
            return at[-1]
        return min(self.probes, key=lambda p: p.rate, default=None)

    def to_json(self, devices: int) -> dict[str, Any]:
        return {
            "goodput": self.goodput,
            "goodput_per_device": self.goodput / devices,
            "saturated": self.saturated,
            "probes": [p.to_json() for p in self.probes],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WorkloadResult:
        probes = [ProbeResult.from_json(p) for p in d["probes"]]
        return cls(probes, float(d["goodput"]), bool(d["saturated"]))


@dataclass
class PlacementResult:
    name: str
    mode: str
    prefill_instances: int
    prefill_tp: int
    decode_instances: int
    devices: int
    deploy_spec: Mapping[str, Any]
    workloads: dict[str, WorkloadResult] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "prefill_instances": self.prefill_instances,
            "prefill_tp": self.prefill_tp,
            "decode_instances": self.decode_instances,
            "devices": self.devices,
            "deploy_spec": dict(self.deploy_spec),
            "workloads": {k: w.to_json(self.devices) for k, w in self.workloads.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PlacementResult:
        keys = ("name", "mode", "prefill_instances", "prefill_tp", "decode_instances", "devices")
        workloads = {k: WorkloadResult.from_json(w) for k, w in d["workloads"].items()}
        return cls(**{k: d[k] for k in keys}, deploy_spec=d["deploy_spec"], workloads=workloads)


@dataclass(frozen=True)
class WorkloadInfo:
    name: str
    workload: str  # the --workload spec
    slos_ms: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "workload": self.workload, "slos_ms": dict(self.slos_ms)}


@dataclass
class SweepResults:
    """Everything a sweep measured; written after every probe so an interrupted run keeps it."""

    experiment: str
    target: float
    device_kind: str  # "cpu" | "cuda"
    threads_per_device: int
    workloads: list[WorkloadInfo]
    placements: list[PlacementResult] = field(default_factory=list)
    extra: Mapping[str, Any] = field(default_factory=dict)  # model, started, ...

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "target": self.target,
            "device_kind": self.device_kind,
            "threads_per_device": self.threads_per_device,
            "workloads": [w.to_json() for w in self.workloads],
            "placements": [p.to_json() for p in self.placements],
            **self.extra,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SweepResults:
        own = {"experiment", "target", "device_kind", "threads_per_device", "workloads"}
        return cls(
            experiment=d["experiment"],
            target=float(d["target"]),
            device_kind=d["device_kind"],
            threads_per_device=int(d["threads_per_device"]),
            workloads=[
                WorkloadInfo(w["name"], w["workload"], w["slos_ms"]) for w in d["workloads"]
            ],
            placements=[PlacementResult.from_json(p) for p in d["placements"]],
            extra={k: v for k, v in d.items() if k not in own | {"placements"}},
        )

    def write(self, out_dir: Path) -> None:
        """results.json and probes.csv, each replaced atomically."""
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(out_dir / RESULTS_FILE, json.dumps(self.to_json(), indent=2) + "\n")
        _atomic_write(out_dir / PROBES_FILE, probes_csv(self))


def load_results(results_dir: Path) -> SweepResults:
    path = results_dir / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give the folder a `pdserve sweep` wrote")
    return SweepResults.from_json(json.loads(path.read_text()))


def probes_csv(results: SweepResults) -> str:
    """One row per probe: placement, workload, devices, the probe's numbers, breakdown in ms."""
    header = ["placement", "workload", "devices", *PROBE_KEYS]
    header += [f"{k}_ms" for k in CSV_BREAKDOWN] + ["records"]
    rows: list[list[Any]] = [header]
    for p in results.placements:
        for name, w in p.workloads.items():
            for probe in w.probes:
                row = [p.name, name, p.devices, *(getattr(probe, k) for k in PROBE_KEYS)]
                row += [probe.breakdown_ms.get(k, "") for k in CSV_BREAKDOWN]
                rows.append([*row, probe.extra.get("records", "")])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return text.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
