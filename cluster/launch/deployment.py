"""Placing a deployment on Ray: prefill TP groups in STRICT_PACK placement groups, decode
replicas, and the router that ties them together (through ``ray_ports``: the router never holds
an actor handle; status, debugging and tests reach the raw handles here)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.cluster.launch.gpu_fit import fit_gpus
from pdserve.cluster.launch.ray_ports import RayDecodePort, RayPrefillPort
from pdserve.cluster.launch.start_wait import waiting, within
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import DeploymentConfig
from pdserve.engine.parallel import check_tp_size, is_kv_sender
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.router.ports import DecodePort, PrefillPort
from pdserve.router.router import PrefillInstance, Router

logger = logging.getLogger(__name__)

PrefillActor = ray.remote(PrefillWorker)
DecodeActor = ray.remote(DecodeWorker)


def _device_slot(config: DeploymentConfig, pool: str) -> dict[str, float]:
    """One worker's Ray resources: its share of a GPU (``gpus_per_worker``), or a CPU slot."""
    if config.model.device != "cuda":
        return {"CPU": 1.0}
    settings = config.prefill if pool == "prefill" else config.decode
    share = settings.gpus_per_worker if settings is not None else None
    return {"GPU": share if share is not None else 1.0}


@dataclass(frozen=True)
class PrefillGroup:
    """One prefill instance's actors: ``ranks[0]`` is the leader; ``senders`` send KV."""

    index: int
    ranks: list[Any]
    senders: list[int]
    cache_blocks: int = 0  # its prefix cache's blocks, read off the leader once started

    @property
    def leader(self) -> Any:
        return self.ranks[0]

    def router_instance(self) -> PrefillInstance:
        """The instance as the router sees it: one port per rank."""
        ports: list[PrefillPort] = [
            RayPrefillPort(h, self.index, r) for r, h in enumerate(self.ranks)
        ]
        return PrefillInstance(self.index, ports, self.senders, cache_blocks=self.cache_blocks)


@dataclass
class Deployment:
    """Live actors of one deployment (raw handles) and the router driving them (through ports)."""

    config: DeploymentConfig
    model: ModelConfig
    router: Router
    prefill: list[PrefillGroup]
    decode: list[Any]
    placement_groups: list[PlacementGroup]

    @classmethod
    async def start(
        cls, config: DeploymentConfig, model: ModelConfig, *, detached: bool = False
    ) -> Deployment:
        """Create and start every actor; ``detached`` placement groups outlive the driver that
        created the (detached) controller."""
        check_tp_size(model.num_heads, model.num_kv_heads, config.prefill_tp)
        config = fit_gpus(config)  # Ray would wait forever for a worker no GPU can hold
        groups: list[PlacementGroup] = []
        decode = [_make_decode(config, j) for j in range(config.decode.instances)]
        prefill = []
        for i in range(config.prefill_instances):
            resources = config.prefill.resources if config.prefill else {}
            pg = placement_group(
                [_device_slot(config, "prefill") | resources] * config.prefill_tp,
                strategy="STRICT_PACK",
                name=f"{config.link_prefix}-prefill{i}",
                lifetime="detached" if detached else None,
            )
            groups.append(pg)
            prefill.append(_make_prefill(config, model, i, pg))
        loads = [d.get_load.remote() for d in decode]  # answered once a replica has started
        try:
            prefill, router = await within(
                config.start_timeout_s,
                _start_workers(config, prefill, decode, loads, groups),
                lambda: waiting(loads, groups, _asks(config)),
            )
        except BaseException:
            _kill([r for p in prefill for r in p.ranks] + decode, groups)
            raise
        return cls(config, model, router, prefill, decode, groups)

    def shutdown(self) -> None:
        _kill([r for p in self.prefill for r in p.ranks] + self.decode, self.placement_groups)

    # -- self-healing: a fresh worker in a dead one's place, under the same index -----------

    async def restart_decode(self, j: int) -> None:
        """Replace decode replica ``j`` (placed as at start) and hand it to the router."""
        _kill([self.decode[j]], [])  # gone already, or cut off: it must not linger
        handle = _make_decode(self.config, j)
        try:
            load = await handle.get_load.remote()
        except BaseException:  # a failed or abandoned start leaves no actor behind
            _kill([handle], [])
            raise
        self.decode[j] = handle
        self.router.replace_decode(j, RayDecodePort(handle, j), load)

    async def restart_prefill(self, i: int) -> None:
        """Replace prefill instance ``i``: every rank, in the instance's own STRICT_PACK
        placement group (its bundles are free once the old ranks are gone)."""
        _kill(list(self.prefill[i].ranks), [])
        pg = self.placement_groups[i]
        group = _make_prefill(self.config, self.model, i, pg)
        try:
            await pg.ready()
            await _start_prefill(group)
            blocks = await group.leader.cache_blocks.remote()
        except BaseException:
            _kill(list(group.ranks), [])
            raise
        self.prefill[i] = dataclasses.replace(group, cache_blocks=blocks)
        self.router.replace_prefill(self.prefill[i].router_instance())


async def _start_workers(
    config: DeploymentConfig,
    prefill: list[PrefillGroup],
    decode: list[Any],
    loads: list[Any],
    groups: list[PlacementGroup],
) -> tuple[list[PrefillGroup], Router]:
    """Wait for every worker to be placed and started, then start the router over them."""
    await asyncio.gather(*(pg.ready() for pg in groups))
    await asyncio.gather(*(_start_prefill(p) for p in prefill), *loads)
    sizes = await asyncio.gather(*(p.leader.cache_blocks.remote() for p in prefill))
    prefill = [dataclasses.replace(p, cache_blocks=n) for p, n in zip(prefill, sizes)]
    ports: list[DecodePort] = [RayDecodePort(h, j) for j, h in enumerate(decode)]
    router = Router([g.router_instance() for g in prefill], ports, config)
    await router.start()
    return prefill, router


def _asks(config: DeploymentConfig) -> dict[str, dict[str, float]]:
    """What one worker of each pool asks Ray for."""
    asks = {"decode": _device_slot(config, "decode") | config.decode.resources}
    if config.prefill is not None:
        asks["prefill"] = _device_slot(config, "prefill") | config.prefill.resources
    return asks


def _make_decode(config: DeploymentConfig, j: int) -> Any:
    slot = _device_slot(config, "decode")
    return DecodeActor.options(
        num_cpus=slot.get("CPU", 0),
        num_gpus=slot.get("GPU", 0),
        resources=config.decode.resources,
        max_concurrency=10_000,
    ).remote(config, j)


def _make_prefill(
    config: DeploymentConfig, model: ModelConfig, i: int, pg: PlacementGroup
) -> PrefillGroup:
    assert config.prefill is not None, "colocated deployments have no prefill pool"
    slot, tp = _device_slot(config, "prefill"), config.prefill.tensor_parallel_size
    ranks = [
        PrefillActor.options(
            num_cpus=slot.get("CPU", 0),
            num_gpus=slot.get("GPU", 0),
            resources=config.prefill.resources,
            max_concurrency=10_000,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=r
            ),
        ).remote(config, i, r)
        for r in range(tp)
    ]
    senders = [r for r in range(tp) if is_kv_sender(model.num_kv_heads, r, tp)]
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
