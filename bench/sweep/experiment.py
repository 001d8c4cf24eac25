"""An experiment for `pdserve sweep`: placements x workloads, each searched for its goodput.

    Experiment.narrowed(...) -> Experiment        only some placements/workloads, fewer probes
    placement_deploy_spec(...) -> dict            the deploy spec one placement runs

Its frozen parts (`Placement`, `SweepWorkload`) and `ExperimentError` are here too;
`sweep.experiment_loader.load_experiment` validates an EXPERIMENT.yaml into them. The YAML
schema is `sweep.schema`; docs/experiments.md documents it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.bench.sweep.schema import PlacementSection

DEPLOY_NAME_PREFIX = "sweep-"


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
