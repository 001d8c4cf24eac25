"""Placements: how a number of devices is split into prefill TP groups and decode replicas (or
colocated instances), the deploy spec that runs one, and the settings a placement runs with. Pure
apart from pydantic."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.bench.plan.profile_model import Profile
from pdserve.cluster.config.resolve import settle
from pdserve.cluster.config.schema import DeploySpec
from pdserve.cluster.config.spec import load_spec
from pdserve.engine.deploy_config import DeploymentConfig

DISAGGREGATED, COLOCATED = "disaggregated", "colocated"
COLOCATED_ONLY = ("chunked_prefill", "max_num_batched_tokens")  # decode keys spec.py rejects


@dataclass(frozen=True)
class Placement:
    """Disaggregated: `prefill_instances` TP groups of `prefill_tp` devices and
    `decode_instances` decode replicas. Colocated: `decode_instances` instances doing both."""

    mode: str
    prefill_instances: int = 0
    prefill_tp: int = 1
    decode_instances: int = 1
    chunked_prefill: bool = False  # colocated: prompts in chunks beside decode steps

    def __post_init__(self) -> None:
        if self.mode not in (DISAGGREGATED, COLOCATED):
            raise ValueError(f"placement mode {self.mode!r}: use {DISAGGREGATED} or {COLOCATED}")
        if self.decode_instances < 1 or self.prefill_tp < 1:
            raise ValueError(f"{self}: needs >= 1 decode instance and a TP degree >= 1")
        if (self.mode == COLOCATED) != (self.prefill_instances == 0):
            raise ValueError(f"{self}: colocated has no prefill pool, disaggregated needs one")
        if self.chunked_prefill and self.mode != COLOCATED:
            raise ValueError(f"{self}: chunked prefill is a colocated option")

    @classmethod
    def colocated(cls, instances: int, chunked_prefill: bool = False) -> Placement:
        return cls(COLOCATED, 0, 1, instances, chunked_prefill)

    @property
    def devices(self) -> int:
        return self.prefill_instances * self.prefill_tp + self.decode_instances

    @property
    def name(self) -> str:
        """``colo2``, ``colo2-chunked``, ``1p1d``, ``2p4d-tp2``."""
        if self.mode == COLOCATED:
            return f"colo{self.decode_instances}" + ("-chunked" if self.chunked_prefill else "")
        tp = f"-tp{self.prefill_tp}" if self.prefill_tp > 1 else ""
        return f"{self.prefill_instances}p{self.decode_instances}d{tp}"


def enumerate_placements(
    devices: int, max_tp: int = 8, tp_ok: Callable[[int], bool] = lambda tp: True
) -> list[Placement]:
    """Every placement using at most `devices` devices: colocated x1..N (prefill priority, and
    chunked prefill), and disaggregated with prefill TP a power of two <= `max_tp` that `tp_ok`
    accepts (it divides the model's heads), any prefill and decode counts."""
    if devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    out = [Placement.colocated(k, c) for k in range(1, devices + 1) for c in (False, True)]
    tp = 1
    while tp <= max_tp and tp + 1 <= devices:
        if tp_ok(tp):
            for p in range(1, (devices - 1) // tp + 1):
                for d in range(1, devices - p * tp + 1):
                    out.append(Placement(DISAGGREGATED, p, tp, d))
        tp *= 2
    return out


def deploy_spec(base: Mapping[str, Any], placement: Placement) -> dict[str, Any]:
    """`base` (a deploy spec as a mapping) with the pools replaced by `placement`'s."""
    data = copy.deepcopy(dict(base))
    data["mode"] = placement.mode
    decode = dict(data.get("decode") or {})
    decode["instances"] = placement.decode_instances
    data["decode"] = decode
    if placement.mode == COLOCATED:
        data.pop("prefill", None)  # colocated specs have no prefill section
        decode["chunked_prefill"] = placement.chunked_prefill
    else:
        for key in COLOCATED_ONLY:
            decode.pop(key, None)
        prefill = dict(data.get("prefill") or {})
        prefill["instances"] = placement.prefill_instances
        prefill["tensor_parallel_size"] = placement.prefill_tp
        data["prefill"] = prefill
    order = list(DeploySpec.model_fields)  # sections in the schema's order, as in deploy/*.yaml
    return dict(sorted(data.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))


def placement_of(spec: DeploySpec) -> Placement:
    if spec.mode == COLOCATED:
        return Placement.colocated(spec.decode.instances, spec.decode.chunked_prefill)
    pool = spec.prefill_pool
    return Placement(
        DISAGGREGATED, pool.instances, pool.tensor_parallel_size, spec.decode.instances
    )


def profile_config(profile: Profile) -> DeploymentConfig:
    """The deploy spec a profile was measured with, settled on its device: the engine settings
    (batching, decode capacity, routing) a placement keeps when plan varies its counts."""
    return settle(load_spec(profile.spec or {"name": "profile"}), profile.device)


def kv_blocks(config: DeploymentConfig, profile: Profile) -> int:
    """KV blocks of each decode replica: the deployment's own sizing rule on the profiled model
    (a memory_fraction cache: what the profile measured an auto cache gets there)."""
    kv = config.decode.kv_cache
    if kv.memory_fraction is not None:
        return max(profile.auto_kv_blocks, 1)
    per_token = profile.model.kv_bytes_per_token(kv_dtype=kv.dtype)
    return max(kv.num_blocks(per_token * config.decode.block_size), 1)


def prefill_cache_blocks(config: DeploymentConfig, profile: Profile, tp: int) -> int:
    """KV blocks of each prefill instance's cache (`prefill.kv_cache`: every rank holds its
    head slice, in decode's KV dtype); a colocated spec has none, a memory_fraction cache holds
    what a decode replica's auto cache does."""
    if config.prefill is None:
        return 0
    kv = config.prefill.kv_cache
    if kv.memory_fraction is not None:
        return max(profile.auto_kv_blocks, 1)
    heads = max(profile.model.num_kv_heads // tp, 1)
    per_token = profile.model.kv_bytes_per_token(heads, config.decode.kv_cache.dtype)
    return max(kv.num_blocks(per_token * config.decode.block_size, key="prefill.kv_cache"), 1)
