"""Loading an experiment for `pdserve sweep`: an EXPERIMENT.yaml (or its mapping) validated
against `sweep.schema` once, every problem collected, and turned into an `Experiment`.

    load_experiment(path) -> Experiment           validated once, paths made absolute

Relative paths (the deploy spec, the model, trace files) are taken from the experiment's
folder; each placement's deploy spec is checked as `placement_deploy_spec` would build it.
docs/experiments.md documents the schema.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pdserve.bench.serve.traces import TraceFormatError
from pdserve.bench.serve.workloads import WorkloadError, parse_workload
from pdserve.bench.sweep.experiment import (
    Experiment,
    ExperimentError,
    Placement,
    SweepWorkload,
    placement_deploy_spec,
)
from pdserve.bench.sweep.schema import ExperimentSection, WorkloadSection
from pdserve.cluster.config.errors import describe_error
from pdserve.cluster.config.spec import SpecError, default_spec_path, load_spec, read_yaml

CHECK_PORT = 8000  # placeholder port when checking a placement's spec; the sweep picks a free one


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
