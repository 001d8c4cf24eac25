"""`pdserve plan`: rank placements of N devices by simulated goodput per device.

Print the ranking (`plan.planner`), then the best placement as a deploy spec ready for
`pdserve up -f`. `--compare` checks the simulator against a real sweep's results.json instead
(or as well): see `plan.compare`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdserve.bench.plan.compare import CompareError, run_compare
from pdserve.bench.plan.placement import Placement, deploy_spec, enumerate_placements
from pdserve.bench.plan.planner import SearchSettings, format_ranking, rank, search_placement
from pdserve.bench.plan.profile_model import Profile, ProfileError
from pdserve.bench.plan.simulator import HostCpu
from pdserve.bench.serve.metrics import GoodputSpecError, parse_goodput
from pdserve.bench.serve.workloads import WORKLOAD_HELP, WorkloadError, parse_workload


class PlanError(ValueError):
    """Plan settings that cannot work; the message says what to pass instead."""


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
    p.add_argument(
        "--prefix-caching", choices=("on", "off"), default=None,
        help="simulate prefix caching on or off in both pools (default: the profile spec's "
        "prefix_caching, on unless it says false); shared-prefix and multi-turn reuse prompts",
    )  # fmt: skip
    p.add_argument(
        "--prefill-cache-blocks", type=int, default=None, metavar="N",
        help="KV blocks of each prefill instance's prefix cache, an LRU (default: the spec's "
        "prefill.kv_cache; 0: the prefill pool caches nothing)",
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
    if args.prefill_cache_blocks is not None and args.prefill_cache_blocks < 0:
        raise PlanError(f"--prefill-cache-blocks {args.prefill_cache_blocks}: give 0 or more")
    caching = None if args.prefix_caching is None else args.prefix_caching == "on"
    return SearchSettings(
        workload, parse_goodput(args.goodput), args.target, args.num_prompts, args.seed,
        args.burstiness, tuple(args.rate_range) if args.rate_range else None, host=host,
        prefix_caching=caching, prefill_cache_blocks=args.prefill_cache_blocks,
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
