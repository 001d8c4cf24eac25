"""`pdserve plan --compare RESULTS.json`: the simulator against a real sweep, probe by probe.

For every placement, workload and probe of a `pdserve sweep` results.json, simulate the
placement its deploy spec describes at the probe's total rate with the same number of requests
and the same seed (the sweep's `seed`, default 0, as `pdserve bench`; a workload's
`burstiness`, default 1), and set the simulated SLO attainment beside the measured one. Errors are simulated minus real, in percentage points.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.plan.placement import placement_of
from pdserve.bench.plan.profile_model import Profile
from pdserve.bench.plan.simulator import HostCpu, plan_shapes, simulate
from pdserve.bench.serve.workloads import parse_workload
from pdserve.cluster.config.resolve import settle

TOLERANCE_PP = 10.0


class CompareError(ValueError):
    """A results.json this comparison cannot read; the message names the missing piece."""


@dataclass(frozen=True)
class CompareRow:
    placement: str
    workload: str
    rate: float  # total req/s of the probe
    num_requests: int
    real: float  # attainment of every SLO, 0..1
    sim: float
    real_by_metric: Mapping[str, float] = field(default_factory=dict)
    sim_by_metric: Mapping[str, float] = field(default_factory=dict)

    @property
    def error_pp(self) -> float:
        return 100.0 * (self.sim - self.real)


@dataclass(frozen=True)
class Comparison:
    rows: list[CompareRow]
    tolerance_pp: float = TOLERANCE_PP

    @property
    def max_abs_error_pp(self) -> float:
        return max((abs(r.error_pp) for r in self.rows), default=0.0)

    @property
    def mean_abs_error_pp(self) -> float:
        return sum(abs(r.error_pp) for r in self.rows) / max(len(self.rows), 1)

    @property
    def within_tolerance(self) -> bool:
        return self.max_abs_error_pp <= self.tolerance_pp

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [asdict(r) | {"error_pp": r.error_pp} for r in self.rows],
            "max_abs_error_pp": self.max_abs_error_pp,
            "mean_abs_error_pp": self.mean_abs_error_pp,
            "tolerance_pp": self.tolerance_pp,
            "within_tolerance": self.within_tolerance,
        }


def compare(
    profile: Profile, results: Mapping[str, Any], host: HostCpu | None = None
) -> Comparison:
    """Simulate every probe of a sweep's results (see the module docstring)."""
    from pdserve.cluster.config.spec import SpecError, load_spec

    workloads = {w["name"]: w for w in _list(results, "workloads")}
    seed = int(results.get("seed", 0))
    rows = []
    for entry in _list(results, "placements"):
        try:
            spec = load_spec(entry["deploy_spec"])
        except (KeyError, SpecError) as e:
            name = entry.get("name")
            raise CompareError(f"placement {name!r}: no usable deploy_spec ({e})") from None
        placement, config = placement_of(spec), settle(spec, profile.device)
        for wname, measured in entry.get("workloads", {}).items():
            if wname not in workloads:
                raise CompareError(f"workload {wname!r} of {entry['name']!r} is not in workloads")
            w = workloads[wname]
            workload, slos = parse_workload(w["workload"]), dict(w["slos_ms"])
            burstiness = float(w.get("burstiness", 1.0))
            for probe in measured.get("probes", []):
                n, rate = int(probe["num_requests"]), float(probe["rate"])
                planned = plan_shapes(
                    workload, n, rate, burstiness, seed, profile.model.max_model_len
                )
                sim = simulate(profile, placement, planned, slos, config, host)
                rows.append(
                    CompareRow(
                        entry.get("name", placement.name),
                        wname,
                        rate,
                        n,
                        float(probe["attainment"]),
                        sim.attainment,
                        _real_by_metric(probe, slos),
                        {m: sim.attainment_of(m) for m in slos},
                    )
                )
    return Comparison(rows)


def _real_by_metric(probe: Mapping[str, Any], slos: Mapping[str, float]) -> dict[str, float]:
    return {m: float(probe[f"{m}_attainment"]) for m in slos if f"{m}_attainment" in probe}


def _list(results: Mapping[str, Any], key: str) -> Sequence[Mapping[str, Any]]:
    value = results.get(key)
    if not isinstance(value, list):
        raise CompareError(f"results.json has no {key!r} list: is it a pdserve sweep result?")
    return value


def format_comparison(c: Comparison) -> str:
    head = ("placement", "workload", "rate", "n", "real %", "sim %", "error pp", "TTFT r/s %",
            "TPOT r/s %")  # fmt: skip
    rows = []
    for r in c.rows:
        per = [
            f"{100 * r.real_by_metric[m]:.0f}/{100 * r.sim_by_metric[m]:.0f}"
            if m in r.real_by_metric else "-"
            for m in ("ttft", "tpot")
        ]  # fmt: skip
        rows.append((r.placement, r.workload, f"{r.rate:.3g}", str(r.num_requests),
                     f"{100 * r.real:.1f}", f"{100 * r.sim:.1f}", f"{r.error_pp:+.1f}", *per))  # fmt: skip
    widths = [max(len(line[i]) for line in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, *rows)]
    verdict = "yes" if c.within_tolerance else "NO"
    return "\n".join([
        lines[0], "-" * len(lines[0]), *lines[1:], "",
        f"{len(c.rows)} probes: max |error| {c.max_abs_error_pp:.1f} pp, mean |error| "
        f"{c.mean_abs_error_pp:.1f} pp; all within {c.tolerance_pp:g} pp: {verdict}",
    ])  # fmt: skip


def run_compare(
    profile: Profile, results_path: Path, out: Path | None, host: HostCpu | None = None
) -> Comparison:
    try:
        results = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{results_path}: cannot read it as JSON ({e})") from None
    _warn_mismatch(profile, results)
    c = compare(profile, results, host)
    print(f"simulator vs {results_path} ({results.get('experiment', 'sweep')}):\n")
    print(format_comparison(c))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(c.to_json(), indent=2) + "\n")
    return c


def _warn_mismatch(profile: Profile, results: Mapping[str, Any]) -> None:
    kind, threads = results.get("device_kind"), results.get("threads_per_device")
    if kind is not None and kind != profile.device:
        print(f"warning: the sweep ran on {kind}, the profile on {profile.device}", file=sys.stderr)
    if threads is not None and int(threads) != profile.threads:
        print(
            f"warning: the sweep ran {threads} thread(s) a device, the profile {profile.threads}",
            file=sys.stderr,
        )
