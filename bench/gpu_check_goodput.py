"""A one-minute goodput probe on one GPU: 1P1D (``deploy/gpu-1x.yaml``: prefill and decode
workers sharing the GPU) against colocated serving at the same request rate, ``make
gpu-check``'s goodput step.

``pdserve sweep`` searches each placement's goodput by bisection over many probes; this runs
one probe of each placement, at one rate, from the sweep's own pieces: the placement's deploy
spec (``placement_deploy_spec``: colocated is the same spec with the prefill pool removed, one
instance doing both phases on the whole GPU), a warm-up, then ``run_probe`` (Poisson arrivals of --workload for
--seconds, cut at the SLO deadline, the /metrics breakdown). Both placements get the same seed:
the same prompts at the same moments. Goodput here is the requests per second that met every
SLO at this one rate (``BenchSummary.request_goodput``), not the highest rate meeting the 90%
target as a sweep finds it; the ratio says which placement serves more of the same load within
its SLOs. When both meet every SLO the rate is below both capacities: raise --rate.

The defaults (rate, workload, SLOs) are a first guess for SmolLM2-135M on one H100.

    python -m pdserve.bench.gpu_check_goodput --spec deploy/gpu-1x.yaml --seconds 30
    python -m pdserve.bench.gpu_check_goodput --spec deploy/local.yaml --rate 1 --seconds 5 \\
        --workload fixed:in=32,out=8 --slo-ttft-ms 5000 --slo-tpot-ms 1000     # on a CPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import yaml

from pdserve.bench.gpu_check_runner import write_result
from pdserve.bench.serve.workloads import parse_workload
from pdserve.bench.sweep.experiment import Placement, SweepWorkload, placement_deploy_spec
from pdserve.bench.sweep.probe import Server, run_probe, warm_up
from pdserve.bench.sweep.results import ProbeResult
from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.spec import load_spec
from pdserve.cluster.launch.controller import launch
from pdserve.cluster.launch.ray_env import init_ray

PLACEMENTS = (
    Placement("1p1d", "disaggregated", 1, 1, 1),
    Placement("colocated", "colocated", 0, 1, 1),
)
SHUTDOWN_TIMEOUT_S = 30
# decode CUDA graphs at one batch size (every step padded to it), for both placements: each
# size costs a flex compilation at start-up, and a cold run of seven (1 ... 64) per placement
# would eat the step's budget
PROBE_CAPTURE_SIZES = [64]


def probe_placement(
    base: Mapping[str, Any], placement: Placement, w: SweepWorkload, args: argparse.Namespace
) -> ProbeResult:
    """Deploy ``placement``, warm it up, probe it at --rate, tear it down whatever happens."""
    spec = placement_deploy_spec(base, placement, model_path=None, threads=1, port=_free_port())
    if placement.colocated:  # the one instance has the whole GPU the 1P1D pair shares
        spec["decode"].pop("gpus_per_worker", None)
    spec["decode"]["cudagraph_capture_sizes"] = PROBE_CAPTURE_SIZES
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    config = resolve(load_spec(spec), gpus_available=gpus)
    start = time.perf_counter()
    actor, url = launch(config, detached=False)
    print(f"{placement.name}: up in {time.perf_counter() - start:.0f} s at {url}", flush=True)
    try:
        return asyncio.run(_probe(url, config.server.api_key, placement, w, args))
    finally:
        with contextlib.suppress(Exception):  # a stuck controller: the kill still frees it all
            ray.get(actor.shutdown.remote(), timeout=SHUTDOWN_TIMEOUT_S)
        ray.kill(actor)


async def _probe(
    url: str, api_key: str | None, p: Placement, w: SweepWorkload, args: argparse.Namespace
) -> ProbeResult:
    server = await Server.discover(url, api_key)
    workload = parse_workload(w.workload)
    await warm_up(server, workload, w, args.warmup, args.seed)
    records = Path(args.records) / f"{p.name}.jsonl"
    records.parent.mkdir(parents=True, exist_ok=True)
    return await run_probe(
        server, workload, w, args.rate, devices=1, seed=args.seed, records_path=records
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def describe(name: str, p: ProbeResult) -> str:
    goodput = p.extra.get("goodput") or 0.0
    return (
        f"{name} {goodput:.2f} req/s good of {p.rate:g} offered ({p.attainment:.0%} met SLOs, "
        f"TTFT {p.ttft_attainment or 0:.0%}, TPOT {p.tpot_attainment or 0:.0%}, "
        f"{p.failed} failed)"
    )


def ratio(probes: Mapping[str, ProbeResult]) -> float | None:
    """1P1D's goodput over colocated's; None without both, or when colocated met no SLO."""
    good = {name: float(p.extra.get("goodput") or 0.0) for name, p in probes.items()}
    return good["1p1d"] / good["colocated"] if good.get("colocated") and "1p1d" in good else None


def markdown(
    probes: Mapping[str, ProbeResult], errors: Mapping[str, str], w: SweepWorkload, seconds: float
) -> str:
    slos = ", ".join(f"{k.upper()} {v:g} ms" for k, v in w.slos_ms.items())
    lines = [
        f"`{w.workload}`, {seconds:g} s of Poisson arrivals each, SLOs {slos}.",
        "",
        "| placement | offered req/s | goodput req/s | met SLOs | TTFT met | TPOT met | "
        "p99 TTFT ms | p99 TPOT ms | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in probes.items():
        x = p.extra
        lines.append(
            f"| {name} | {p.rate:g} | {x.get('goodput') or 0:.2f} | {p.attainment:.0%} | "
            f"{p.ttft_attainment or 0:.0%} | {p.tpot_attainment or 0:.0%} | "
            f"{x.get('p99_ttft_ms', math.nan):.0f} | {x.get('p99_tpot_ms', math.nan):.1f} | "
            f"{p.failed} |"
        )
    lines += [
        f"| {name} | failed: {' '.join(e.split())} | | | | | | | |" for name, e in errors.items()
    ]
    r = ratio(probes)
    if r is not None:
        lines += ["", f"1P1D over colocated: {r:.2f}x the goodput at the same rate."]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.gpu_check_goodput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--spec", type=Path, default=Path("deploy/gpu-1x.yaml"), help="1P1D spec")
    p.add_argument("--rate", type=float, default=8.0, help="requests/s offered (default 8)")
    p.add_argument("--seconds", type=float, default=30.0, help="arrivals per probe (default 30)")
    p.add_argument("--workload", default="fixed:in=512,out=64", help="a pdserve bench workload")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0, help="TTFT SLO (default 500)")
    p.add_argument("--slo-tpot-ms", type=float, default=50.0, help="TPOT SLO (default 50)")
    p.add_argument("--warmup", type=int, default=16, help="unmeasured requests first (16)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    p.add_argument("--records", help="per-request records folder (default: beside --result)")
    p.add_argument("--result", help="write the figures here as JSON (gpu_check's step result)")
    args = p.parse_args(argv)
    if not args.spec.is_file():
        p.error(f"--spec {args.spec}: no such file (the one-GPU 1P1D spec is deploy/gpu-1x.yaml)")
    if args.records is None:
        folder = Path(args.result).parent if args.result else Path(tempfile.mkdtemp())
        args.records = str(folder / "goodput-records")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base = yaml.safe_load(args.spec.read_text())
    n = math.ceil(args.rate * args.seconds)
    slos = {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms}
    w = SweepWorkload("probe", args.workload, slos, args.rate, args.rate, n, 1.0, args.seconds)
    probes: dict[str, ProbeResult] = {}
    errors: dict[str, str] = {}
    init_ray(namespace="pdserve")
    try:
        for placement in PLACEMENTS:  # one failing still leaves the other's figures
            try:
                probes[placement.name] = probe_placement(base, placement, w, args)
            except Exception as e:
                errors[placement.name] = f"{type(e).__name__}: {e}"
                print(f"{placement.name} FAILED: {errors[placement.name]}", flush=True)
            else:
                print(describe(placement.name, probes[placement.name]), flush=True)
            if args.result:  # after each placement: a cut-short run keeps the first's figures
                write_result(args.result, _result(probes, errors, w, args.seconds))
    finally:
        ray.shutdown()
    print(_result(probes, errors, w, args.seconds)["summary"])
    return 1 if errors else 0


def _result(
    probes: Mapping[str, ProbeResult], errors: Mapping[str, str], w: SweepWorkload, seconds: float
) -> dict[str, Any]:
    r = ratio(probes)
    parts = [describe(k, p) for k, p in probes.items()]
    parts += [f"{k} FAILED ({e})" for k, e in errors.items()]
    summary = f"1P1D/colocated goodput {'n/a' if r is None else f'{r:.2f}x'}: {'; '.join(parts)}"
    data = {"summary": summary, "markdown": markdown(probes, errors, w, seconds), "ratio": r}
    return data | {k: p.to_json() for k, p in probes.items()} | {"errors": dict(errors)}


if __name__ == "__main__":
    raise SystemExit(main())
