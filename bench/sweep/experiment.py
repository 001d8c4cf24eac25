"""An experiment for `pdserve sweep`: placements x workloads, each searched for its goodput.

    load_experiment(path) -> Experiment           validated once, paths made absolute
    placement_deploy_spec(...) -> dict            the deploy spec one placement runs

The YAML schema is `sweep.schema`; docs/experiments.md documents it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pdserve.bench.serve.traces import TraceFormatError
from pdserve.bench.serve.workloads import WorkloadError, parse_workload
from pdserve.bench.sweep.schema import ExperimentSection, PlacementSection, WorkloadSection
from pdserve.cluster.config.errors import describe_error
from pdserve.cluster.config.spec import SpecError, default_spec_path, load_spec, read_yaml

DEPLOY_NAME_PREFIX = "sweep-"
CHECK_PORT = 8000  # placeholder port when checking a placement's spec; the sweep picks a free one


class ExperimentError(ValueError):
    """An experiment that cannot run. ``problems``: one line each, key path first, then the fix."""

    def __init__(self, problems: Sequence[str], source: str = "experiment") -> None:
        self.problems = list(problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(
            f"{source}: {len(self.problems)} {noun}" + "".join(f"\n  {p}" for p in self.problems)
        )


@dataclass(frozen=True)
class Placement:
    """Pool sizes of one deployment. Colocated: `decode_instances` instances, no prefill pool."""

    name: str
    mode: str  # "colocated" | "disaggregated"
    prefill_instances: int  # 0 when colocated
    prefill_tp: int
    decode_instances: int

    @property
    def colocated(self) -> bool:
        return self.mode == "colocated"

    @property
    def devices(self) -> int:
        """Devices (GPUs, or CPU slots) the placement occupies: one per actor."""
        return self.prefill_instances * self.prefill_tp + self.decode_instances

    @classmethod
    def from_section(cls, s: PlacementSection) -> Placement:
        if s.mode == "colocated":
            assert s.instances is not None, "the schema requires instances when colocated"
            return cls(s.name, s.mode, 0, 1, s.instances)
        assert s.prefill_instances is not None and s.decode_instances is not None
        return cls(s.name, s.mode, s.prefill_instances, s.prefill_tp or 1, s.decode_instances)


@dataclass(frozen=True)
class SweepWorkload:
    """One workload: its `--workload` spec (trace paths absolute), SLOs, per-device rate range."""

    name: str
    workload: str
    slos_ms: Mapping[str, float]  # {"ttft": 1000.0, "tpot": 50.0}
    rate_lo: float  # requests/s per device
    rate_hi: float
    num_prompts: int
    burstiness: float
    min_duration_s: float = 0.0

    def num_requests(self, rate: float) -> int:
        """Requests a probe at `rate` req/s sends: num_prompts, or more to last min_duration_s."""
        return max(self.num_prompts, math.ceil(rate * self.min_duration_s))


@dataclass(frozen=True)
class Experiment:
    """A validated experiment; nothing here needs Ray, a model or the network."""

    name: str
    base_deploy: Mapping[str, Any]  # the deploy spec's sections, before a placement is applied
    model_bench: str | None  # "tiny" | "small": built locally at run time
    model_path: str | None  # a checkpoint directory or builtin:...; None with neither: the spec's
    placements: tuple[Placement, ...]
    workloads: tuple[SweepWorkload, ...]
    target: float
    rel_tol: float
    max_probes: int
    warmup_requests: int
    seed: int
    threads_per_device: int
    output_dir: Path

    @property
    def max_devices(self) -> int:
        return max(p.devices for p in self.placements)

    def narrowed(
        self,
        placements: Sequence[str] = (),
        workloads: Sequence[str] = (),
        num_prompts: int | None = None,
        max_probes: int | None = None,
    ) -> Experiment:
        """A cut-down copy: only the named placements/workloads, fewer prompts or probes."""
        kept_p = _pick(self.placements, placements, "--placements")
        kept_w = _pick(self.workloads, workloads, "--workloads")
        if num_prompts is not None:
            kept_w = tuple(replace(w, num_prompts=num_prompts) for w in kept_w)
        probes = self.max_probes if max_probes is None else max_probes
        return replace(self, placements=kept_p, workloads=kept_w, max_probes=probes)


def _pick(items: tuple[Any, ...], names: Sequence[str], flag: str) -> tuple[Any, ...]:
    if not names:
        return items
    known = [item.name for item in items]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ExperimentError(
            [f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}"]
        )
    return tuple(item for item in items if item.name in names)


# --- loading ----------------------------------------------------------------------------------


def load_experiment(
    source: str | Path | Mapping[str, Any], base_dir: Path | None = None
) -> Experiment:
    """Validate an EXPERIMENT.yaml (or its mapping); relative paths are taken from its folder
    (`base_dir` for a mapping, default the working directory)."""
    origin = "experiment" if isinstance(source, Mapping) else str(source)
    try:
        data = source if isinstance(source, Mapping) else read_yaml(Path(source))
    except SpecError as e:
        raise ExperimentError(e.problems, origin) from None
    if not isinstance(source, Mapping):
        base_dir = Path(source).resolve().parent
    base_dir = (base_dir or Path.cwd()).resolve()
    if not isinstance(data, Mapping):
        raise ExperimentError(
            ["the top level must be a mapping (name, placements, workloads, ...)"], origin
        )
    try:
        section = ExperimentSection.model_validate(data)
    except ValidationError as e:
        raise ExperimentError(
            [describe_error(err, ExperimentSection) for err in e.errors()], origin
        ) from None
    problems: list[str] = []
    base = _base_deploy(section.deploy, base_dir, problems)
    workloads = tuple(_workload(w, i, base_dir, problems) for i, w in enumerate(section.workloads))
    placements = tuple(Placement.from_section(p) for p in section.placements)
    model_path = None
    if section.model is not None and section.model.path is not None:
        model_path = _model_path(section.model.path, base_dir)
    for i, p in enumerate(placements):
        _check_placement(base, p, i, model_path, problems)
    if problems:
        raise ExperimentError(problems, origin)
    return Experiment(
        name=section.name,
        base_deploy=base,
        model_bench=section.model.bench if section.model is not None else None,
        model_path=model_path,
        placements=placements,
        workloads=workloads,
        target=section.target,
        rel_tol=section.bisection.rel_tol,
        max_probes=section.bisection.max_probes,
        warmup_requests=section.warmup_requests,
        seed=section.seed,
        threads_per_device=section.threads_per_device,
        output_dir=Path(section.output_dir or f"results/{section.name}"),
    )


def _base_deploy(
    source: str | dict[str, Any] | None, base_dir: Path, problems: list[str]
) -> dict[str, Any]:
    if isinstance(source, dict):
        data: Any = source
    else:
        path = default_spec_path() if source is None else base_dir / source
        try:
            data = read_yaml(path)
        except SpecError as e:
            problems.extend(f"deploy: {path}: {p}" for p in e.problems)
            return {}
    if not isinstance(data, Mapping):
        problems.append(
            "deploy: the deploy spec must be a mapping of sections (mode, model, decode, ...)"
        )
        return {}
    for pool in ("prefill", "decode"):
        section = data.get(pool)
        if isinstance(section, Mapping) and section.get("resources"):
            problems.append(
                f"deploy.{pool}.resources: a sweep decides how many devices each role gets, "
                "so custom resources would leave actors unschedulable; remove resources"
            )
    return copy.deepcopy(dict(data))


def _model_path(path: str, base_dir: Path) -> str:
    return (
        path if path.startswith("builtin:") else str((base_dir / Path(path).expanduser()).resolve())
    )


def _workload(w: WorkloadSection, i: int, base_dir: Path, problems: list[str]) -> SweepWorkload:
    where = f"workloads.{i}.workload"
    spec, missing = _absolute_trace(w.workload, base_dir)
    if missing is not None:
        problems.append(f"{where}: {missing}")
    else:
        try:
            if parse_workload(spec).replays_timestamps:
                problems.append(
                    f"{where}: the sweep sets the request rate itself, so a trace's timestamps "
                    f"cannot be replayed; add ,timestamps=false to {w.workload!r}"
                )
        except (WorkloadError, TraceFormatError) as e:
            problems.append(f"{where}: {e}")
    return SweepWorkload(
        name=w.name,
        workload=spec,
        slos_ms={k: v for k, v in w.slos_ms.model_dump().items() if v is not None},
        rate_lo=w.rate_per_device.lo,
        rate_hi=w.rate_per_device.hi,
        num_prompts=w.num_prompts,
        burstiness=w.burstiness,
        min_duration_s=w.min_duration_s,
    )


def _absolute_trace(spec: str, base_dir: Path) -> tuple[str, str | None]:
    """(spec with the trace path made absolute, a problem if the file is missing)."""
    kind, sep, rest = spec.partition(":")
    path_text, comma, options = rest.partition(",")
    if kind.strip().lower() != "trace" or not sep or not path_text.strip():
        return spec, None  # not a trace, or parse_workload reports what is wrong
    path = (base_dir / Path(path_text.strip()).expanduser()).resolve()
    if path.is_file():
        return f"trace:{path}{comma}{options}", None
    return spec, (
        f"trace file {path} not found (written {path_text.strip()!r}, relative to the "
        f"experiment's folder {base_dir}); put the trace there or fix the path"
    )


def _check_placement(
    base: Mapping[str, Any], p: Placement, i: int, model_path: str | None, problems: list[str]
) -> None:
    if not base:
        return  # the base spec's own problem is reported already
    spec = placement_deploy_spec(base, p, model_path=model_path, threads=1, port=CHECK_PORT)
    try:
        load_spec(spec)
    except SpecError as e:
        problems.extend(f"placements.{i} ({p.name}): deploy spec: {line}" for line in e.problems)


def placement_deploy_spec(
    base: Mapping[str, Any],
    placement: Placement,
    *,
    model_path: str | None,
    threads: int,
    port: int,
) -> dict[str, Any]:
    """The base deploy spec with this placement's pools, model, thread count, name and port."""
    spec = copy.deepcopy(dict(base))
    spec["name"] = DEPLOY_NAME_PREFIX + placement.name
    spec["mode"] = placement.mode
    if model_path is not None:
        spec["model"] = {**spec.get("model", {}), "path": model_path}
    decode = dict(spec.get("decode") or {})
    decode["instances"] = placement.decode_instances
    spec["decode"] = decode
    if placement.colocated:
        spec.pop("prefill", None)
    else:
        prefill = dict(spec.get("prefill") or {})
        prefill["instances"] = placement.prefill_instances
        prefill["tensor_parallel_size"] = placement.prefill_tp
        spec["prefill"] = prefill
    spec["ray"] = {**(spec.get("ray") or {}), "num_threads_per_cpu_worker": threads}
    spec["server"] = {**(spec.get("server") or {}), "port": port}
    return spec
