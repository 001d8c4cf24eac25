"""`pdserve sweep`: for each placement of an experiment, deploy, warm up, search each workload's
goodput (the highest rate meeting the SLO attainment target), tear down; write the results.

One Ray instance serves the whole sweep. On CPUs each actor is one Ray CPU slot running
`threads_per_device` torch threads, and Ray gets as many slots as the largest placement needs;
on GPUs each actor is one GPU. A deployment is torn down whatever happens (errors, Ctrl-C).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Any

import ray
import torch
from rich.console import Console

from pdserve.bench.models import servable_model
from pdserve.bench.serve.workloads import parse_workload
from pdserve.bench.sweep.bisection import RateBisection
from pdserve.bench.sweep.experiment import (
    Experiment,
    Placement,
    SweepWorkload,
    placement_deploy_spec,
)
from pdserve.bench.sweep.probe import Server, run_probe, warm_up
from pdserve.bench.sweep.results import (
    PlacementResult,
    ProbeResult,
    SweepResults,
    WorkloadInfo,
    WorkloadResult,
)
from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.spec import load_spec
from pdserve.cluster.launch.controller import launch
from pdserve.cluster.launch.ray_env import init_ray
from pdserve.engine.deploy_config import DeploymentConfig

logger = logging.getLogger(__name__)

RECORDS_DIR = "records"
SHUTDOWN_TIMEOUT_S = 60


def run_sweep(experiment: Experiment, out_dir: Path, console: Console) -> SweepResults:
    """Every placement in turn; results.json is rewritten after each probe."""
    model_path = _model_path(experiment)
    own_ray = _init_ray(experiment, console)
    try:
        results: SweepResults | None = None
        for placement in experiment.placements:
            spec = placement_deploy_spec(
                experiment.base_deploy,
                placement,
                model_path=model_path,
                threads=experiment.threads_per_device,
                port=_free_port(),
            )
            gpus = ray.cluster_resources().get("GPU", 0) > 0
            resolved = resolve(load_spec(spec), gpus_available=gpus)
            if results is None:
                results = _empty_results(experiment, resolved)
            result = PlacementResult(
                placement.name,
                placement.mode,
                placement.prefill_instances,
                placement.prefill_tp,
                placement.decode_instances,
                placement.devices,
                spec,
            )
            results.placements.append(result)
            _run_placement(experiment, placement, resolved, result, results, out_dir, console)
    finally:
        if own_ray:
            ray.shutdown()
    assert results is not None, "an experiment has at least one placement"
    return results


def _model_path(experiment: Experiment) -> str | None:
    if experiment.model_bench is not None:
        return str(servable_model(experiment.model_bench))
    return experiment.model_path


def _init_ray(experiment: Experiment, console: Console) -> bool:
    """Connect to the base spec's Ray cluster or start a local one; False if already up."""
    if ray.is_initialized():
        return False
    address = (experiment.base_deploy.get("ray") or {}).get("address")
    if address:
        init_ray(address, namespace="pdserve")
        return True
    device = (experiment.base_deploy.get("model") or {}).get("device", "auto")
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    slots = experiment.max_devices
    if cpu and slots * experiment.threads_per_device > (os.cpu_count() or 1):
        console.print(
            f"[yellow]warning[/]: the largest placement needs {slots} device(s) x "
            f"{experiment.threads_per_device} thread(s) but this machine has {os.cpu_count()} "
            "CPU(s): devices will share cores and the numbers will not mean much"
        )
    init_ray(namespace="pdserve", num_cpus=slots if cpu else None)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _empty_results(experiment: Experiment, resolved: DeploymentConfig) -> SweepResults:
    return SweepResults(
        experiment=experiment.name,
        target=experiment.target,
        device_kind=resolved.model.device,
        threads_per_device=experiment.threads_per_device,
        workloads=[WorkloadInfo(w.name, w.workload, w.slos_ms) for w in experiment.workloads],
        extra={
            "model": resolved.model.path,
            "bisection": {"rel_tol": experiment.rel_tol, "max_probes": experiment.max_probes},
            "seed": experiment.seed,
        },
    )


def _run_placement(
    experiment: Experiment,
    placement: Placement,
    resolved: DeploymentConfig,
    result: PlacementResult,
    results: SweepResults,
    out_dir: Path,
    console: Console,
) -> None:
    with console.status(f"deploying [bold]{placement.name}[/] ({_describe(placement)})"):
        actor, url = launch(resolved, detached=False)
    console.print(f"[green]deployed[/] {placement.name} ({_describe(placement)}) at {url}")
    try:
        sweep = _PlacementSweep(experiment, placement, result, results, out_dir, console)
        asyncio.run(sweep.run(url, resolved.server.api_key))
    finally:
        _teardown(actor, placement.name, console)


def _teardown(actor: Any, name: str, console: Console) -> None:
    try:
        ray.get(actor.shutdown.remote(), timeout=SHUTDOWN_TIMEOUT_S)
    except Exception as e:  # a dead or stuck controller: the kill below still frees everything
        logger.warning("shutting %s down: %r", name, e)
    ray.kill(actor)
    console.print(f"torn down {name}")


def _describe(p: Placement) -> str:
    if p.colocated:
        return f"{p.decode_instances} colocated, {p.devices} device(s)"
    tp = f" x TP{p.prefill_tp}" if p.prefill_tp > 1 else ""
    return f"{p.prefill_instances}P{tp} + {p.decode_instances}D, {p.devices} device(s)"


class _PlacementSweep:
    """The probes of one live deployment: per workload, warm up then bisect the rate."""

    def __init__(
        self,
        experiment: Experiment,
        placement: Placement,
        result: PlacementResult,
        results: SweepResults,
        out_dir: Path,
        console: Console,
    ) -> None:
        self.experiment, self.placement = experiment, placement
        self.result, self.results = result, results
        self.out_dir, self.console = out_dir, console

    async def run(self, url: str, api_key: str | None) -> None:
        server = await Server.discover(url, api_key)
        for w in self.experiment.workloads:
            await self._workload(server, w)

    async def _workload(self, server: Server, w: SweepWorkload) -> None:
        e, devices = self.experiment, self.placement.devices
        workload = parse_workload(w.workload)
        with self.console.status(f"{self.placement.name} / {w.name}: warming up"):
            await warm_up(server, workload, w, e.warmup_requests, e.seed)
        search = RateBisection(
            w.rate_lo * devices,
            w.rate_hi * devices,
            e.target,
            rel_tol=e.rel_tol,
            max_probes=e.max_probes,
        )
        outcome = self.result.workloads[w.name] = WorkloadResult()
        while (rate := search.next_rate()) is not None:
            records = f"{self.placement.name}__{w.name}__{len(outcome.probes):02d}.jsonl"
            with self.console.status(
                f"{self.placement.name} / {w.name}: {rate:.3g} req/s, {w.num_requests(rate)} requests"
            ):
                probe = await run_probe(
                    server,
                    workload,
                    w,
                    rate,
                    devices=devices,
                    seed=e.seed,
                    records_path=self.out_dir / RECORDS_DIR / records,
                )
            search.record(rate, probe.attainment)
            found = search.result()
            outcome.probes.append(probe)
            outcome.goodput, outcome.saturated = found.best_rate, found.saturated
            self.results.write(self.out_dir)
            self.console.print(self._line(w, probe), highlight=False)

    def _line(self, w: SweepWorkload, p: ProbeResult) -> str:
        met = "[green]meets[/]" if p.attainment >= self.experiment.target else "[red]misses[/]"
        parts = [f"{name.upper()} {share:.0%}" for name, share in _per_slo(p) if share is not None]
        return (
            f"  {self.placement.name:<14} {w.name:<14} {p.rate:7.3g} req/s "
            f"({p.rate_per_device:.3g}/device)  attainment {p.attainment:6.1%} {met} "
            f"({', '.join(parts)}; {p.failed} failed, {p.duration_s:.1f} s)"
        )


def _per_slo(p: ProbeResult) -> list[tuple[str, float | None]]:
    return [("ttft", p.ttft_attainment), ("tpot", p.tpot_attainment)]
