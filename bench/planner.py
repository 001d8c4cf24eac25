"""`pdserve plan`: rank placements of N devices by simulated goodput per device.

For every placement that fits (colocated x1..N; disaggregated with prefill TP 1, 2, 4, ...,
any prefill and decode counts), bisect the highest request rate whose simulated SLO attainment
meets the target (`bench.bisection`, the sweep's own search), print the ranking, and print the
best placement as a deploy spec ready for `pdserve up -f`. `--compare` checks the simulator
against a real sweep's results.json instead (or as well): see `bench.plan_compare`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.bisection import BisectionResult, bisect_rate
from pdserve.bench.metrics import GoodputSpecError, parse_goodput
from pdserve.bench.placement import Placement, deploy_spec, enumerate_placements
from pdserve.bench.plan_compare import CompareError, run_compare
from pdserve.bench.profile_model import Profile, ProfileError
from pdserve.bench.simulator import HostCpu
from pdserve.bench.workloads import WORKLOAD_HELP, Workload, WorkloadError, parse_workload


class PlanError(ValueError):
    """Plan settings that cannot work; the message says what to pass instead."""


@dataclass(frozen=True)
class Ranked:
    placement: Placement
    search: BisectionResult | None  # None: the placement cannot run (error says why)
    error: str = ""

    @property
    def goodput(self) -> float:
        return self.search.best_rate if self.search else 0.0

    @property
    def per_device(self) -> float:
        return self.goodput / self.placement.devices


@dataclass(frozen=True)
class SearchSettings:
    workload: Workload
    slos_ms: Mapping[str, float]
    target: float = 0.9
    num_prompts: int = 300
    seed: int = 0
    burstiness: float = 1.0
    rate_range: tuple[float, float] | None = None  # None: from the profile (rate_range_for)
    rel_tol: float = 0.05
    max_probes: int = 12
    host: HostCpu | None = None  # None: the profiled host (CPU) or a device each (GPU)


def rate_range_for(profile: Profile, workload: Workload, devices: int) -> tuple[float, float]:
    """A range sure to hold the answer: above it, even `devices` prefill instances batching
    full token budgets could not prefill the prompts fast enough."""
    shapes = workload.sample(256, seed=0)
    mean_in = max(1, round(sum(s.input_len for s in shapes) / len(shapes)))
    per_batch = max(1, min(profile.knobs.max_batch_tokens // mean_in, profile.knobs.max_batch_size))
    batch_s = profile.prefill_ms([mean_in] * per_batch) / 1e3
    hi = 1.5 * devices * per_batch / max(batch_s, 1e-6)
    return hi / 1000, hi


def rank(
    placements: Sequence[Placement],
    evaluate: Callable[[Placement], Ranked],
    progress: Callable[[Placement], None] = lambda p: None,
) -> list[Ranked]:
    """Evaluate each placement; best goodput per device first, then more goodput, fewer devices."""
    out = []
    for p in placements:
        progress(p)
        out.append(evaluate(p))
    return sorted(out, key=lambda r: (-r.per_device, -r.goodput, r.placement.devices))


def search_placement(
    profile: Profile, placement: Placement, spec: Mapping[str, Any], s: SearchSettings
) -> Ranked:
    """Bisect one placement's goodput with the simulator, running the knobs its spec gives."""
    from pdserve.bench.placement import knobs_of
    from pdserve.bench.simulator import plan_shapes, simulate
    from pdserve.cluster.spec import SpecError, load_spec

    try:
        knobs = knobs_of(load_spec(spec), profile.model, profile.auto_kv_blocks)
    except SpecError as e:
        return Ranked(placement, None, str(e))
    lo, hi = s.rate_range or rate_range_for(profile, s.workload, placement.devices)
    max_len = profile.model.max_model_len

    def attainment(rate: float) -> float:
        planned = plan_shapes(s.workload, s.num_prompts, rate, s.burstiness, s.seed, max_len)
        return simulate(profile, placement, planned, s.slos_ms, knobs, s.host).attainment

    try:
        found = bisect_rate(
            attainment, lo, hi, s.target, rel_tol=s.rel_tol, max_probes=s.max_probes
        )
    except ValueError as e:  # e.g. a KV cache smaller than the model's context
        return Ranked(placement, None, str(e))
    return Ranked(placement, found)


def format_ranking(ranked: Sequence[Ranked], top: int) -> str:
    head = ("#", "placement", "devices", "goodput req/s", "per device", "probes", "note")
    rows = []
    for i, r in enumerate(ranked[:top], 1):
        note = r.error[:60] if r.error else ""
        if r.search is not None and r.search.saturated:
            note = "met the target at the top of the range: a lower bound"
        rows.append((
            str(i), r.placement.name, str(r.placement.devices), f"{r.goodput:.3f}",
            f"{r.per_device:.3f}", str(len(r.search.probes) if r.search else 0), note,
        ))  # fmt: skip
    return _table(head, rows)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *rows)]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = WORKLOAD_HELP
    p.add_argument("--profile", required=True, type=Path, help="profile JSON (pdserve profile)")
    p.add_argument("--devices", type=int, help="devices to place (GPUs; CPU workers on CPU)")
    p.add_argument("--workload", help="what to send, as in pdserve bench (see below)")
    p.add_argument(
        "--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50"
    )
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment to meet (0.9)")
    p.add_argument("--num-prompts", type=int, default=300, help="requests per simulated run")
    p.add_argument("--seed", type=int, default=0, help="lengths and arrivals, as pdserve bench")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps")
    p.add_argument(
        "--rate-range", nargs=2, type=float, metavar=("LO", "HI"), help="req/s to search in"
    )
    p.add_argument("--max-tp", type=int, default=8, help="largest prefill TP degree to try")
    p.add_argument(
        "--cpu-cores", type=float, default=None,
        help="CPU profiles: cores the workers share (default: the profiled machine's)",
    )  # fmt: skip
    p.add_argument(
        "--background-cores", type=float, default=0.0,
        help="CPU profiles: cores kept busy by other load on the host (default 0)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=10, help="placements to list (10)")
    p.add_argument("-o", "--out", type=Path, help="write the best placement's deploy spec here")
    p.add_argument(
        "--compare", type=Path, metavar="RESULTS.json", help="check the simulator against a sweep"
    )
    p.add_argument("--compare-json", type=Path, metavar="OUT", help="write the comparison here")


def run_plan(args: argparse.Namespace) -> int:
    """`pdserve plan`: 0 on success, 2 on bad input."""
    try:
        profile = Profile.load(args.profile)
        host = HostCpu.of(profile, args.background_cores, args.cpu_cores)
        if args.compare is not None:
            run_compare(profile, args.compare, args.compare_json, host)
        if args.compare is None or args.devices is not None or args.workload is not None:
            _plan(profile, args, host)
    except (PlanError, CompareError, ProfileError, WorkloadError, GoodputSpecError) as e:
        print(f"pdserve plan: error: {e}", file=sys.stderr)
        return 2
    return 0


def _settings(args: argparse.Namespace, host: HostCpu) -> SearchSettings:
    if args.devices is None or args.workload is None or not args.goodput:
        raise PlanError("give --devices N, --workload W and --goodput NAME:MS (or --compare)")
    workload = parse_workload(args.workload)
    if workload.replays_timestamps:
        raise PlanError(
            f"--workload {workload.spec!r} replays a trace's timestamps, so there is no rate to "
            "search: add ,timestamps=false to use its lengths at searched rates"
        )
    if args.rate_range is not None and not 0 < args.rate_range[0] < args.rate_range[1]:
        raise PlanError(f"--rate-range {args.rate_range}: give LO HI with 0 < LO < HI")
    if args.num_prompts < 1 or not 0 < args.target <= 1:
        raise PlanError("--num-prompts must be >= 1 and --target in (0, 1]")
    return SearchSettings(
        workload, parse_goodput(args.goodput), args.target, args.num_prompts, args.seed,
        args.burstiness, tuple(args.rate_range) if args.rate_range else None, host=host,
    )  # fmt: skip


def _plan(profile: Profile, args: argparse.Namespace, host: HostCpu) -> None:
    import yaml
    from tqdm import tqdm

    settings = _settings(args, host)
    if not profile.spec:
        raise PlanError(f"{args.profile} records no deploy spec: re-run pdserve profile -f SPEC")
    m = profile.model

    def tp_ok(tp: int) -> bool:  # engine/parallel.py check_tp_size, without importing torch
        kv = m.num_kv_heads
        return m.num_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)

    placements = enumerate_placements(args.devices, args.max_tp, tp_ok)
    with tqdm(total=len(placements), desc="simulating placements", file=sys.stderr) as bar:

        def progress(p: Placement) -> None:
            bar.set_postfix_str(p.name)
            bar.update()

        ranked = rank(
            placements,
            lambda p: search_placement(profile, p, deploy_spec(profile.spec, p), settings),
            progress,
        )
    shared = f", workers sharing {host.cores:g} CPU cores" if host.cores else ""
    print(
        f"workload {settings.workload.spec}, SLOs {dict(settings.slos_ms)} ms, target "
        f"{settings.target:.0%}, {settings.num_prompts} requests a run, {args.devices} "
        f"devices{shared}\n"
    )
    print(format_ranking(ranked, args.top))
    best = next((r for r in ranked if r.search is not None and r.goodput > 0), None)
    if best is None:
        print("\nno placement meets the SLOs at any rate searched: relax them or add devices")
        return
    text = yaml.safe_dump(deploy_spec(profile.spec, best.placement), sort_keys=False)
    print(f"\n# best: {best.placement.name}, {best.goodput:.3f} req/s "
          f"({best.per_device:.3f} per device); deploy with pdserve up -f FILE\n{text}")  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
