"""Placing a deployment on Ray: prefill TP groups in STRICT_PACK placement groups, decode
replicas, and the router that ties them together (through ``ray_ports``: the router never holds
an actor handle; status, debugging and tests reach the raw handles here)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.cluster.ray_ports import RayDecodePort, RayPrefillPort
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import ModelConfig
from pdserve.engine.parallel import check_tp_size, is_kv_sender
from pdserve.engine.spec import WHOLE_PREFILL_BUDGET, DecodeSpec, EngineSpec, PrefillSpec
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.router.ports import DecodePort, PrefillPort
from pdserve.router.router import PrefillInstance, Router, RouterConfig

logger = logging.getLogger(__name__)

PrefillActor = ray.remote(PrefillWorker)
DecodeActor = ray.remote(DecodeWorker)


@dataclass(frozen=True)
class ClusterSpec:
    """A resolved deployment: no ``auto`` left in it."""

    engine: EngineSpec
    prefill_instances: int = 1
    prefill_tp: int = 1
    decode_instances: int = 1
    max_batch_tokens: int = 8192
    max_batch_size: int = 64
    max_num_seqs: int = 64
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 512 << 20
    kv_cache_memory_fraction: float | None = None
    # colocated mode (see DecodeSpec): per-step token budget and chunked prefill
    max_num_batched_tokens: int = WHOLE_PREFILL_BUDGET
    chunked_prefill: bool = False
    router: RouterConfig = field(default_factory=RouterConfig)
    # Ray resources each actor asks for besides its device slot (e.g. {"prefill": 1}).
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)

    @property
    def colocated(self) -> bool:
        """No prefill pool: every decode instance prefills its own prompts."""
        return self.prefill_instances == 0

    @property
    def num_actors(self) -> int:
        return self.prefill_instances * self.prefill_tp + self.decode_instances


def _device_slot(engine: EngineSpec) -> dict[str, float]:
    return {"GPU": 1.0} if engine.device == "cuda" else {"CPU": 1.0}


@dataclass(frozen=True)
class PrefillGroup:
    """One prefill instance's actors: ``ranks[0]`` is the leader; ``senders`` send KV."""

    index: int
    ranks: list[Any]
    senders: list[int]

    @property
    def leader(self) -> Any:
        return self.ranks[0]

    def router_instance(self) -> PrefillInstance:
        """The instance as the router sees it: one port per rank."""
        ports: list[PrefillPort] = [
            RayPrefillPort(h, self.index, r) for r, h in enumerate(self.ranks)
        ]
        return PrefillInstance(self.index, ports, self.senders)


@dataclass
class Deployment:
    """Live actors of one deployment (raw handles) and the router driving them (through ports)."""

    spec: ClusterSpec
    config: ModelConfig
    router: Router
    prefill: list[PrefillGroup]
    decode: list[Any]
    placement_groups: list[PlacementGroup]

    @classmethod
    async def start(
        cls, spec: ClusterSpec, config: ModelConfig, *, detached: bool = False
    ) -> Deployment:
        """Create and start every actor; ``detached`` placement groups outlive the driver that
        created the (detached) controller."""
        check_tp_size(config.num_heads, config.num_kv_heads, spec.prefill_tp)
        groups: list[PlacementGroup] = []
        decode = [_make_decode(spec, j) for j in range(spec.decode_instances)]
        prefill = []
        for i in range(spec.prefill_instances):
            pg = placement_group(
                [_device_slot(spec.engine) | spec.prefill_resources] * spec.prefill_tp,
                strategy="STRICT_PACK",
                name=f"{spec.router.link_prefix}-prefill{i}",
                lifetime="detached" if detached else None,
            )
            groups.append(pg)
            prefill.append(_make_prefill(spec, config, i, pg))
        try:
            await asyncio.gather(*(pg.ready() for pg in groups))
            await asyncio.gather(
                *(_start_prefill(p) for p in prefill), *(d.get_load.remote() for d in decode)
            )
            ports: list[DecodePort] = [RayDecodePort(h, j) for j, h in enumerate(decode)]
            router = Router([g.router_instance() for g in prefill], ports, spec.router)
            await router.start()
        except BaseException:
            _kill([r for p in prefill for r in p.ranks] + decode, groups)
            raise
        return cls(spec, config, router, prefill, decode, groups)

    def shutdown(self) -> None:
        _kill([r for p in self.prefill for r in p.ranks] + self.decode, self.placement_groups)


def _make_decode(spec: ClusterSpec, j: int) -> Any:
    slot = _device_slot(spec.engine)
    dspec = DecodeSpec(
        instance=j,
        max_num_seqs=spec.max_num_seqs,
        num_blocks=spec.num_kv_blocks,
        kv_cache_bytes=spec.kv_cache_bytes,
        kv_cache_memory_fraction=spec.kv_cache_memory_fraction,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        chunked_prefill=spec.chunked_prefill,
    )
    return DecodeActor.options(
        num_cpus=slot.get("CPU", 0),
        num_gpus=slot.get("GPU", 0),
        resources=spec.decode_resources,
        max_concurrency=10_000,
    ).remote(spec.engine, dspec)


def _make_prefill(
    spec: ClusterSpec, config: ModelConfig, i: int, pg: PlacementGroup
) -> PrefillGroup:
    slot = _device_slot(spec.engine)
    ranks = [
        PrefillActor.options(
            num_cpus=slot.get("CPU", 0),
            num_gpus=slot.get("GPU", 0),
            resources=spec.prefill_resources,
            max_concurrency=10_000,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=r
            ),
        ).remote(
            spec.engine,
            PrefillSpec(i, r, spec.prefill_tp, spec.max_batch_tokens, spec.max_batch_size),
        )
        for r in range(spec.prefill_tp)
    ]
    senders = [
        r for r in range(spec.prefill_tp) if is_kv_sender(config.num_kv_heads, r, spec.prefill_tp)
    ]
    return PrefillGroup(i, ranks, senders)


async def _start_prefill(p: PrefillGroup) -> None:
    host, port = await p.leader.tp_address.remote()
    await asyncio.gather(
        *(
            rank.start.remote(host, port, p.ranks[1:] if r == 0 else [])
            for r, rank in enumerate(p.ranks)
        )
    )


def _kill(actors: list[Any], groups: list[PlacementGroup]) -> None:
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception as e:  # already dead: nothing to free
            logger.debug("kill: %s", e)
    for pg in groups:
        try:
            remove_placement_group(pg)
        except Exception as e:
            logger.debug("remove placement group: %s", e)
