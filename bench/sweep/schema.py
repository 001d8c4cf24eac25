"""The schema of an EXPERIMENT.yaml for `pdserve sweep`: pydantic at the YAML edge, frozen,
unknown keys rejected, every error one line naming the key path and what to write instead
(`cluster.spec_errors.describe_error`, shared with the deploy spec).

`sweep.experiment_loader.load_experiment` validates a file with it and turns it into frozen
dataclasses; docs/experiments.md documents every key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, model_validator

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?")
BENCH_MODELS = ("tiny", "small")
DEFAULT_TARGET = 0.9


def _name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"must be 1-24 characters of a-z, 0-9 and '-' (not at either end), e.g. 1p1d, "
            f"got {value!r}"
        )
    return value


def _deploy_source(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(
        "must be the path of a deploy spec YAML (relative to this file, e.g. ../local.yaml) "
        f"or the spec's sections inline (mode, model, decode, ...), got {value!r}"
    )


def _power_of_two(value: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"must be a power of two (1, 2, 4, 8), got {value}")
    return value


Name = Annotated[str, AfterValidator(_name)]
Positive = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    """Base of every section: frozen, strict types (no "8" for 8), unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelChoice(Section):
    """The model every placement serves: a benchmark model by name, or a path (one of them)."""

    bench: Literal["tiny", "small"] | None = None
    path: str | None = None  # a checkpoint directory (relative to this file) or builtin:tiny-llama

    @model_validator(mode="after")
    def _one(self) -> ModelChoice:
        if (self.bench is None) == (self.path is None):
            raise ValueError(
                "give exactly one of bench (tiny or small: built locally) or path "
                "(a checkpoint directory or builtin:tiny-llama), e.g. {bench: small}"
            )
        return self


class PlacementSection(Section):
    """One way to place the model: colocated instances, or prefill TP groups + decode replicas."""

    name: Name
    mode: Literal["colocated", "disaggregated"]
    instances: Positive | None = None  # colocated only
    prefill_instances: Positive | None = None  # disaggregated only
    prefill_tp: Annotated[int, AfterValidator(_power_of_two)] | None = None
    decode_instances: Positive | None = None

    @model_validator(mode="after")
    def _fits_mode(self) -> PlacementSection:
        pools = {"prefill_instances", "prefill_tp", "decode_instances"}
        given = {k for k in pools if getattr(self, k) is not None}
        if self.mode == "colocated":
            if given or self.instances is None:
                raise ValueError(
                    "a colocated placement has no prefill/decode pools: write only "
                    "instances: N (each instance runs both phases on one device)"
                )
        elif self.instances is not None or self.prefill_instances is None:
            raise ValueError(
                "a disaggregated placement needs prefill_instances, decode_instances and "
                "optionally prefill_tp (default 1), e.g. {prefill_instances: 1, decode_instances: 1}"
            )
        elif self.decode_instances is None:
            raise ValueError("a disaggregated placement needs decode_instances: N")
        return self


class SLOSection(Section):
    """Latency objectives in milliseconds; a request meets the SLO when it meets each given one."""

    ttft: PositiveFloat | None = None
    tpot: PositiveFloat | None = None
    e2el: PositiveFloat | None = None

    @model_validator(mode="after")
    def _some(self) -> SLOSection:
        if self.ttft is None and self.tpot is None and self.e2el is None:
            raise ValueError(
                "give at least one of ttft, tpot, e2el (ms), e.g. {ttft: 1000, tpot: 50}"
            )
        return self


class RateRange(Section):
    """Requests/s per device: the bisection probes lo x devices .. hi x devices."""

    lo: PositiveFloat
    hi: PositiveFloat

    @model_validator(mode="after")
    def _ordered(self) -> RateRange:
        if not self.lo < self.hi:
            raise ValueError(f"lo must be below hi, got lo={self.lo}, hi={self.hi}")
        return self


class WorkloadSection(Section):
    """One workload to search a goodput for: lengths, SLOs, rate range, requests per probe."""

    name: Name
    workload: Annotated[str, Field(min_length=1)]  # `pdserve bench --workload` syntax
    slos_ms: SLOSection
    rate_per_device: RateRange
    num_prompts: Positive = 100
    # a probe at rate r sends at least r x min_duration_s requests: long enough for a backlog
    # to build at a rate just above capacity (a few requests in a burst would all be served)
    min_duration_s: Annotated[float, Field(ge=0)] = 0.0
    burstiness: PositiveFloat = 1.0


class BisectionSection(Section):
    rel_tol: PositiveFloat = 0.1  # stop when the bracket is this narrow, relative to its low end
    max_probes: Annotated[int, Field(ge=2)] = 6


class ExperimentSection(Section):
    """A whole EXPERIMENT.yaml (see deploy/experiments/ and docs/experiments.md)."""

    name: Name
    # a deploy YAML (relative to this file) or its sections inline; None: deploy/local.yaml
    deploy: Annotated[str | dict[str, Any], PlainValidator(_deploy_source)] | None = None
    model: ModelChoice | None = None  # None: the deploy spec's model.path
    placements: Annotated[list[PlacementSection], Field(min_length=1)]
    workloads: Annotated[list[WorkloadSection], Field(min_length=1)]
    target: Annotated[float, Field(gt=0, le=1)] = DEFAULT_TARGET
    bisection: BisectionSection = Field(default_factory=BisectionSection)
    warmup_requests: Annotated[int, Field(ge=0)] = 4
    seed: int = 0
    threads_per_device: Positive = 1  # torch threads of each CPU worker (ignored on GPUs)
    output_dir: str | None = None  # None: results/<name> under the working directory

    @model_validator(mode="after")
    def _unique_names(self) -> ExperimentSection:
        for key, items in (("placements", self.placements), ("workloads", self.workloads)):
            names = [item.name for item in items]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{key}: names must differ, {', '.join(twice)} appears twice")
        return self
