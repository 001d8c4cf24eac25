"""The deploy spec: one YAML file, validated at the edge, resolved once into frozen config.

    load_spec(path) -> DeploySpec            pydantic, frozen; every problem named by key path
    resolve(spec, gpus_available=...) -> ResolvedDeployment   no ``auto`` left; what Ray runs

The schema lives in ``spec_schema``; docs/operations.md documents every key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pdserve.cluster.deployment import ClusterSpec
from pdserve.cluster.settings import ServerSettings
from pdserve.cluster.spec_errors import describe_error
from pdserve.cluster.spec_schema import (
    BUILTIN_PREFIX,
    DeploySpec,
    KVCache,
)
from pdserve.engine import envs
from pdserve.engine.spec import EngineSpec, step_budget_problem, step_token_budget
from pdserve.router.router import RouterConfig

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 512 << 20  # decode KV cache on CPU when kv_cache is auto
CUDA_KV_MEMORY_FRACTION = 0.9  # share of a decode GPU a replica fills when kv_cache is auto
# deploy/local.yaml, embedded so an installed pdserve finds its default spec without a checkout
# (tests/unit/test_spec.py keeps the two identical).
LOCAL_SPEC_YAML = """\
# The default deployment: the built-in tiny model, one prefill and one decode actor, on CPU.
# `pdserve up` uses it when no -f is given. Every key is documented in docs/operations.md.
name: local
mode: disaggregated
model:
  path: builtin:tiny-llama
  dtype: auto
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


@dataclass(frozen=True)
class ResolvedDeployment:
    """A spec with every ``auto`` settled: what ``pdserve up`` hands to the controller."""

    name: str
    namespace: str  # Ray namespace "pdserve-<name>"; also the KV link prefix
    mode: str  # "disaggregated" | "colocated" (colocated: cluster.prefill_instances == 0)
    cluster: ClusterSpec
    server: ServerSettings
    ray_address: str | None
    # Decode on CUDA: share of the GPU's memory a replica may fill (weights + activations + KV);
    # the KV cache gets the rest. None on CPU or when the size is given as blocks/memory.
    # ClusterSpec/DecodeSpec need a field to carry it to the decode worker.
    kv_cache_memory_fraction: float | None = None


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
    checkout = Path(__file__).resolve().parent.parent / "deploy" / "local.yaml"
    if checkout.is_file():
        return checkout
    return write_embedded_spec(envs.cache_dir() / "deploy" / "local.yaml")


def write_embedded_spec(path: Path) -> Path:
    """Write the embedded default spec to `path` (unless already identical); returns `path`."""
    if not (path.is_file() and path.read_text() == LOCAL_SPEC_YAML):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(LOCAL_SPEC_YAML)
    return path


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice (plain YAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (again on line {line}); keep one"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A YAML file as plain data; a missing file, bad YAML or a key written twice -> SpecError."""
    try:
        text = path.read_text()
    except OSError as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else str(e)
        raise SpecError(
            [f"cannot read it ({reason}); pass a spec such as deploy/local.yaml"], str(path)
        ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise SpecError([f"not valid YAML: {where}{e.problem}"], str(path)) from None
    except yaml.YAMLError as e:
        raise SpecError([f"not valid YAML: {e}"], str(path)) from None


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
        for key, written in (
            ("chunked_prefill", decode.chunked_prefill),
            ("max_num_batched_tokens", decode.max_num_batched_tokens != "auto"),
        ):
            if written:
                problems.append(
                    f"decode.{key}: only applies in colocated mode (prefill instances run whole "
                    "prompts; use prefill.max_batch_tokens there); remove it or write "
                    "mode: colocated"
                )
    elif decode.max_num_batched_tokens != "auto":
        problem = step_budget_problem(
            decode.max_num_batched_tokens, decode.max_num_seqs, decode.chunked_prefill
        )
        if problem is not None:
            problems.append(f"decode.max_num_batched_tokens: {problem}")
    return problems


# --- resolving --------------------------------------------------------------------------------


def resolve(
    spec: DeploySpec, *, gpus_available: bool, environ: Mapping[str, str] | None = None
) -> ResolvedDeployment:
    """Settle every ``auto`` for the cluster at hand; builds the tiny model for ``builtin:``.

    Model-dependent checks (tensor-parallel size against the heads, max_model_len against the
    positions) run when the model directory exists here; otherwise they are skipped with a
    warning and the workers check the model on their own nodes.
    """
    problems: list[str] = []
    device = _device(spec.model.device, gpus_available, problems)
    model_path = _model_path(spec.model.path)
    _check_model(spec, model_path, device, problems)
    kv_blocks, kv_bytes, kv_fraction = _kv_cache(spec.decode.kv_cache, device, problems)
    try:
        api_key = read_api_key(spec.server.api_key, environ)
    except SpecError as e:
        api_key, problems = None, problems + e.problems
    if spec.kv_transfer.backend == "nccl" and device != "cuda":
        problems.append(
            "kv_transfer.backend: nccl moves CUDA tensors and the model runs on cpu; "
            "write gloo or auto"
        )
    if problems:
        raise SpecError(problems, f"deploy spec {spec.name!r}")
    if spec.server.host in ("0.0.0.0", "::") and api_key is None:
        logger.warning(
            "server.host %s serves every network interface with no api_key", spec.server.host
        )
    namespace = f"pdserve-{spec.name}"
    return ResolvedDeployment(
        name=spec.name,
        namespace=namespace,
        mode=spec.mode,
        cluster=_cluster(spec, model_path, device, namespace, kv_blocks, kv_bytes, kv_fraction),
        server=ServerSettings(
            host=spec.server.host,
            port=spec.server.port,
            api_key=api_key,
            served_model_name=_served_name(spec.model.served_name, spec.model.path, model_path),
            max_request_bytes=spec.server.max_request_bytes,
            max_queued_requests=spec.router.max_queued_requests,
            jobs_dir=str(envs.cache_dir() / "jobs" / spec.name),
        ),
        ray_address=spec.ray.address,
        kv_cache_memory_fraction=kv_fraction,
    )


def read_api_key(value: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``server.api_key``: a literal key, or ``env:VAR`` read from `environ` (default os.environ).

    The one environment read outside engine/envs.py: the variable's name comes from the spec,
    so no fixed accessor there can serve it. Raises SpecError when VAR is unset or empty.
    """
    if value is None or not value.startswith("env:"):
        return value
    var = value.removeprefix("env:")
    key = (os.environ if environ is None else environ).get(var, "")
    if not key:
        raise SpecError(
            [
                f"server.api_key: environment variable {var} is not set; "
                f"export {var}=<key> or write the key itself"
            ]
        )
    return key


def _device(device: str, gpus_available: bool, problems: list[str]) -> str:
    if device == "auto":
        return "cuda" if gpus_available else "cpu"
    if device == "cuda" and not gpus_available:
        problems.append("model.device: cuda, but the Ray cluster has no GPUs; write cpu or auto")
    return device


def _model_path(path: str) -> str:
    """A local directory: ``builtin:tiny-<arch>`` is built in the cache dir on first use."""
    if path.startswith(BUILTIN_PREFIX):
        from pdserve.engine.tiny_model import default_tiny_model  # imports transformers

        arch = path.removeprefix(BUILTIN_PREFIX + "tiny-")
        return str(default_tiny_model(arch))
    return str(Path(path).expanduser().absolute())


def _served_name(served_name: str, spec_path: str, model_path: str) -> str:
    if served_name != "auto":
        return served_name
    if spec_path.startswith(BUILTIN_PREFIX):
        return spec_path.removeprefix(BUILTIN_PREFIX)
    return Path(model_path).name


def _check_model(spec: DeploySpec, model_path: str, device: str, problems: list[str]) -> None:
    if not Path(model_path).exists():
        logger.warning(
            "model.path %s does not exist on this machine: skipping the checks that need the "
            "model (tensor_parallel_size, max_model_len); each worker checks it on its node",
            model_path,
        )
        return
    from pdserve.engine.config import ModelConfig, ModelLoadError  # imports transformers
    from pdserve.engine.parallel import check_tp_size

    try:
        config = ModelConfig.from_pretrained(model_path, dtype=spec.model.dtype, device=device)
    except ModelLoadError as e:
        problems.append(f"model.path: {e}")
        return
    max_len, max_pos = spec.model.max_model_len, config.max_position_embeddings
    if max_len != "auto" and max_len > max_pos:
        problems.append(
            f"model.max_model_len: must be at most the model's max_position_embeddings "
            f"({max_pos}), got {max_len}; write auto or a smaller value"
        )
    tp = spec.prefill_pool.tensor_parallel_size
    if spec.mode == "disaggregated":
        try:
            check_tp_size(config.num_heads, config.num_kv_heads, tp)
        except ValueError as e:
            problems.append(f"prefill.tensor_parallel_size: {e}")


def _kv_cache(
    kv: KVCache, device: str, problems: list[str]
) -> tuple[int | None, int, float | None]:
    """(num_kv_blocks, kv_cache_bytes, memory_fraction) for ClusterSpec and the controller."""
    if kv.blocks is not None:
        return kv.blocks, CPU_KV_CACHE_BYTES, None
    if kv.memory is not None:
        return None, kv.memory, None
    if kv.memory_fraction is not None:
        if device != "cuda":
            problems.append(
                "decode.kv_cache.memory_fraction: only applies on GPUs and the model runs on "
                'cpu; write {memory: "512MiB"} or {blocks: N}'
            )
        return None, CPU_KV_CACHE_BYTES, kv.memory_fraction
    fraction = CUDA_KV_MEMORY_FRACTION if device == "cuda" else None
    return None, CPU_KV_CACHE_BYTES, fraction


def _cluster(
    spec: DeploySpec,
    model_path: str,
    device: str,
    namespace: str,
    kv_blocks: int | None,
    kv_bytes: int,
    kv_fraction: float | None,
) -> ClusterSpec:
    prefill, decode = spec.prefill_pool, spec.decode
    max_len = spec.model.max_model_len
    engine = EngineSpec(
        model=model_path,
        dtype=spec.model.dtype,
        device=device,
        max_model_len=None if max_len == "auto" else max_len,
        num_threads=spec.ray.num_threads_per_cpu_worker,
        kv_backend=spec.kv_transfer.backend,
        block_size=decode.block_size,
    )
    router = RouterConfig(
        prefill_policy=spec.router.prefill_policy,
        decode_policy=spec.router.decode_policy,
        block_size=decode.block_size,
        link_prefix=namespace,
    )
    return ClusterSpec(
        engine=engine,
        prefill_instances=prefill.instances if spec.mode == "disaggregated" else 0,
        prefill_tp=prefill.tensor_parallel_size,
        decode_instances=decode.instances,
        max_batch_tokens=prefill.max_batch_tokens,
        max_batch_size=prefill.max_batch_size,
        max_num_seqs=decode.max_num_seqs,
        num_kv_blocks=kv_blocks,
        kv_cache_bytes=kv_bytes,
        kv_cache_memory_fraction=kv_fraction,
        max_num_batched_tokens=step_token_budget(
            None if decode.max_num_batched_tokens == "auto" else decode.max_num_batched_tokens,
            decode.max_num_seqs,
            decode.chunked_prefill,
        ),
        chunked_prefill=decode.chunked_prefill,
        router=router,
        prefill_resources=dict(prefill.resources),
        decode_resources=dict(decode.resources),
    )
