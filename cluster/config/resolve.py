"""Resolving a validated deploy spec into the frozen `DeploymentConfig` that Ray runs.

    resolve(spec, gpus_available=...) -> DeploymentConfig    for a launch: the model is located
                                         (``builtin:`` built), checked, the API key read
    settle(spec, device) -> DeploymentConfig                  the same tree without touching the
                                         model or the environment (the planner, the simulator)

Every ``auto`` is settled here and nowhere else. The YAML spec and ``LLM(...)`` (which builds a
spec from its keywords) both come through this module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from pdserve.cluster.config.schema import DeploySpec, KVCache, PrefillKVCache
from pdserve.cluster.config.spec import SpecError
from pdserve.engine import envs
from pdserve.engine.builtin_models import (
    BUILTIN_PREFIX,
    BuiltinModelError,
    builtin_path,
    is_builtin,
)
from pdserve.engine.deploy_config import (
    DecodeSettings,
    DeploymentConfig,
    KVCacheSize,
    ModelSettings,
    PrefillSettings,
    RouterSettings,
    ServerSettings,
    step_token_budget,
)
from pdserve.engine.speculative import SpeculativeSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

CPU_KV_CACHE_BYTES = 512 << 20  # decode KV cache on CPU when kv_cache is auto
CUDA_KV_MEMORY_FRACTION = 0.9  # share of a decode GPU a replica fills when kv_cache is auto
CUDA_PREFILL_KV_MEMORY_FRACTION = 0.7  # share of a prefill GPU its rank's KV cache fills (auto)


def resolve(
    spec: DeploySpec, *, gpus_available: bool, environ: Mapping[str, str] | None = None
) -> DeploymentConfig:
    """Settle every ``auto`` for the cluster at hand; locates (or builds) a ``builtin:`` model.

    Model-dependent checks (tensor-parallel size against the heads, max_model_len against the
    positions) run when the model exists here; otherwise they are skipped with a warning and
    the workers check the model on their own nodes.
    """
    problems: list[str] = []
    device = _device(spec.model.device, gpus_available, problems)
    try:
        model_path = _model_path(spec.model.path)
    except BuiltinModelError as e:
        raise SpecError([f"model.path: {e}"], f"deploy spec {spec.name!r}") from None
    _check_model(spec, model_path, device, problems)
    try:
        api_key = read_api_key(spec.server.api_key, environ)
    except SpecError as e:
        api_key, problems = None, problems + e.problems
    if spec.kv_transfer.backend == "nccl" and device != "cuda":
        problems.append(
            "kv_transfer.backend: nccl moves CUDA tensors and the model runs on cpu; "
            "write gloo or auto"
        )
    _check_gpu_shares(spec, device, problems)
    config: DeploymentConfig | None = None
    try:
        config = settle(spec, device, model_path=model_path, api_key=api_key)
    except SpecError as e:
        problems += e.problems
    if problems or config is None:
        raise SpecError(problems, f"deploy spec {spec.name!r}")
    if spec.server.host in ("0.0.0.0", "::") and api_key is None:
        logger.warning(
            "server.host %s serves every network interface with no api_key", spec.server.host
        )
    return config


def settle(
    spec: DeploySpec, device: str, *, model_path: str | None = None, api_key: str | None = None
) -> DeploymentConfig:
    """The tree for ``spec`` on ``device`` ("cpu" or "cuda"). ``model_path``: where the model
    is (default: the spec's path as written); ``api_key``: the key itself (not ``env:VAR``).

    A settings field takes the value of the spec field of the same name in its section, so a
    new knob needs no line here; only what is settled (``auto``, paths, keys) is written out.
    """
    problems: list[str] = []
    kv = _kv_cache(spec.decode.kv_cache, device, problems)
    m, d = spec.model, spec.decode
    path = model_path or m.path
    budget = None if d.max_num_batched_tokens == "auto" else d.max_num_batched_tokens
    config = DeploymentConfig(
        name=spec.name,
        model=_same_named(
            m, ModelSettings, path=path, device=device,
            max_model_len=None if m.max_model_len == "auto" else m.max_model_len,
            num_threads=spec.ray.num_threads_per_cpu_worker,
        ),
        prefill=None if spec.mode == "colocated" else _same_named(
            spec.prefill_pool, PrefillSettings,
            kv_cache=_kv_size(spec.prefill_pool.kv_cache, device, problems, "prefill.kv_cache"),
            chunked_prefill=spec.prefill_pool.chunked_prefill or d.chunked_prefill,
        ),
        decode=_same_named(
            d, DecodeSettings, kv_cache=kv,
            max_num_batched_tokens=step_token_budget(budget, d.max_num_seqs, d.chunked_prefill),
            speculative=_speculative(d.speculative),
        ),
        kv_backend=spec.kv_transfer.backend,
        prefix_caching=spec.prefix_caching,
        router=_same_named(spec.router, RouterSettings),
        server=_same_named(
            spec.server, ServerSettings, api_key=api_key,
            served_model_name=_served_name(m.served_name, m.path, path),
            jobs_dir=str(envs.cache_dir() / "jobs" / spec.name),
        ),
        ray_address=spec.ray.address,
        start_timeout_s=spec.ray.start_timeout_s,
    )  # fmt: skip
    if problems:
        raise SpecError(problems, f"deploy spec {spec.name!r}")
    return config


def _speculative(section: BaseModel | None) -> SpeculativeSettings | None:
    """``decode.speculative`` settled: a draft model named builtin:<name> becomes its path."""
    if section is None:
        return None
    draft = getattr(section, "draft_model", None)
    return _same_named(
        section, SpeculativeSettings, draft_model=_model_path(draft) if draft else None
    )


def _same_named(section: BaseModel, settings: type[T], **settled: Any) -> T:
    """``settings`` from the section's fields of the same names, then the ``settled`` values
    (a mapping field is copied: the tree shares nothing with the spec)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        if f.name in settled:
            values[f.name] = settled[f.name]
        elif f.name in type(section).model_fields:
            value = getattr(section, f.name)
            values[f.name] = dict(value) if isinstance(value, Mapping) else value
    return settings(**values)


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


def _check_gpu_shares(spec: DeploySpec, device: str, problems: list[str]) -> None:
    """``gpus_per_worker`` below 1 shares a GPU between workers: GPUs only, and never between
    the ranks of one tensor-parallel group (NCCL cannot join two ranks on one GPU)."""
    pools = [("decode", spec.decode.gpus_per_worker)]
    if spec.mode != "colocated":
        pools.append(("prefill", spec.prefill_pool.gpus_per_worker))
    for pool, share in pools:
        if share is not None and share < 1 and device != "cuda":
            problems.append(
                f"{pool}.gpus_per_worker: only applies on GPUs and the model runs on cpu; "
                "leave it out"
            )
    tp, share = spec.prefill_pool.tensor_parallel_size, spec.prefill_pool.gpus_per_worker
    if spec.mode != "colocated" and share is not None and share < 1 and tp > 1:
        problems.append(
            f"prefill.gpus_per_worker: {spec.prefill_pool.gpus_per_worker} would put ranks of a "
            f"tensor-parallel group (size {tp}) on one GPU, where NCCL cannot join them; give "
            "each rank a whole GPU (1) or use tensor_parallel_size 1"
        )


def _device(device: str, gpus_available: bool, problems: list[str]) -> str:
    if device == "auto":
        return "cuda" if gpus_available else "cpu"
    if device == "cuda" and not gpus_available:
        problems.append("model.device: cuda, but the Ray cluster has no GPUs; write cpu or auto")
    return device


def _model_path(path: str) -> str:
    """A local directory or file; a ``builtin:`` name is found (or built) here."""
    if is_builtin(path):
        return str(builtin_path(path))
    return str(Path(path).expanduser().absolute())


def _served_name(served_name: str, spec_path: str, model_path: str) -> str:
    if served_name != "auto":
        return served_name
    if is_builtin(spec_path):
        return spec_path.removeprefix(BUILTIN_PREFIX)
    path = Path(model_path)
    return path.stem if path.suffix.lower() == ".gguf" else path.name


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
    if spec.mode == "disaggregated":
        try:
            check_tp_size(
                config.num_heads, config.num_kv_heads, spec.prefill_pool.tensor_parallel_size
            )
        except ValueError as e:
            problems.append(f"prefill.tensor_parallel_size: {e}")


def _kv_cache(kv: KVCache, device: str, problems: list[str]) -> KVCacheSize:
    """The KV cache: its dtype, and the size rule: what was written, else 512 MiB on CPU and
    90% of a GPU."""
    return dataclasses.replace(_kv_size(kv, device, problems), dtype=kv.dtype)


def _kv_size(
    kv: KVCache | PrefillKVCache, device: str, problems: list[str], key: str = "decode.kv_cache"
) -> KVCacheSize:
    if kv.blocks is not None:
        return KVCacheSize(blocks=kv.blocks)
    if kv.memory is not None:
        return KVCacheSize(memory_bytes=kv.memory)
    if kv.memory_fraction is not None:
        if device != "cuda":
            problems.append(
                f"{key}.memory_fraction: only applies on GPUs and the model runs on "
                'cpu; write {memory: "512MiB"} or {blocks: N}'
            )
        return KVCacheSize(memory_fraction=kv.memory_fraction)
    if key.startswith("prefill"):
        return auto_prefill_kv_cache(device)
    return auto_kv_cache(device)


def auto_kv_cache(device: str) -> KVCacheSize:
    """What ``kv_cache: auto`` means on ``device``: 512 MiB on CPU, 90% of a GPU."""
    if device == "cuda":
        return KVCacheSize(memory_fraction=CUDA_KV_MEMORY_FRACTION)
    return KVCacheSize(memory_bytes=CPU_KV_CACHE_BYTES)


def auto_prefill_kv_cache(device: str) -> KVCacheSize:
    """What ``prefill.kv_cache: auto`` means: 512 MiB on CPU, 70% of a GPU (a prefill step's
    activations grow with its tokens: more is left to them than on decode)."""
    if device == "cuda":
        return KVCacheSize(memory_fraction=CUDA_PREFILL_KV_MEMORY_FRACTION)
    return KVCacheSize(memory_bytes=CPU_KV_CACHE_BYTES)
