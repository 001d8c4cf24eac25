"""`pdserve profile -f SPEC`: measure the spec's model on this hardware and fit latency models.

Loads the spec's model on the spec's device with the spec's thread count and times the real
engine code in-process (no Ray): prefill batches of several compositions (TP 1 here; TP > 1
with real process groups across spawned ranks), decode steps over batch size x context through
the paged path, KV transfers over a real link to a receiver process, and prefill while sending
its KV. Optionally (the default without --quick) it measures the fixed per-request costs
through a real local deployment over HTTP. It fits the models of `plan.latency_model`, prints
their quality and writes everything, raw samples included, as JSON (`plan.profile_model`).
The grid of what is measured is `profile.grid`; the measuring itself (torch) is `profile.runner`,
imported only when a profile runs, so `--help` stays light.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", type=Path, help="deploy spec (default: deploy/local.yaml)")
    p.add_argument(
        "--experiment", type=Path, metavar="EXPERIMENT.yaml",
        help="instead of -f: the deploy spec, model and threads of a pdserve sweep experiment",
    )  # fmt: skip
    p.add_argument("-o", "--out", type=Path, default=Path("profile.json"), help="profile JSON")
    p.add_argument("--quick", action="store_true", help="a few points, one repeat (tests)")
    p.add_argument(
        "--max-tp", type=int, default=None,
        help="measure prefill TP degrees up to this (default: the spec's tensor_parallel_size); "
        "others are modeled from TP 1",
    )  # fmt: skip
    p.add_argument(
        "--max-prefill-tokens", type=int, default=4096,
        help="largest prefill batch measured, in tokens (default 4096, at most the spec's "
        "max_batch_tokens); the fit extrapolates beyond",
    )  # fmt: skip
    p.add_argument(
        "--overheads", choices=("measure", "default"), default=None,
        help="fixed per-request costs: measure through a local deployment over HTTP (default "
        "without --quick) or use the documented defaults",
    )  # fmt: skip


def run_profile(args: argparse.Namespace) -> int:
    """`pdserve profile`: 0 on success, 2 on a bad spec."""
    from pdserve.bench.profile.runner import ProfileSetupError, profile_spec

    try:
        profile = profile_spec(args)
    except ProfileSetupError as e:
        print(f"pdserve profile: error: {e}", file=sys.stderr)
        return 2
    profile.save(args.out)
    print(format_quality(profile.to_json()))
    print(f"\nwrote {args.out}")
    return 0


def format_quality(data: dict[str, Any]) -> str:
    """The fit-quality block printed after profiling."""
    lines = [f"{'model':<22} R²       max rel err  mean rel err  samples  coefficients"]

    def row(name: str, fit: dict[str, Any]) -> None:
        coef = ", ".join(f"{k}={v:.4g}" for k, v in fit["coef"].items())
        lines.append(
            f"{name:<22} {fit['r2']:<8.4f} {100 * fit['max_rel_err']:>9.1f}%  "
            f"{100 * fit['mean_rel_err']:>10.1f}%  {fit['num_samples']:>7}  {coef}"
        )

    for tp, fit in data["prefill"].items():
        row(f"prefill TP{tp} (ms)", fit)
    row("decode step (ms)", data["decode"])
    if data["transfer"]["fit"]:
        row("KV transfer (ms)", data["transfer"]["fit"])
    mixed = data["samples"].get("mixed") or []
    if mixed:
        err = max(abs(m["predicted_ms"] - m["ms"]) / m["ms"] for m in mixed)
        lines.append(
            f"{'decode+chunk step':<22} composed from the two fits: max rel err "
            f"{100 * err:.1f}% on {len(mixed)} measured chunked-prefill steps"
        )
    t, o = data["transfer"], data["overheads"]
    excess = ", ".join(f"{b}: {ms:.1f}" for b, ms in o["decode_excess_ms"]) or f"{o['step_ms']:.2f}"
    lines.append(
        f"\nlink {t['bandwidth_gbps']:.2f} GB/s + {t['latency_ms']:.2f} ms; KV lands "
        f"{data['kv_land_ms'] or t['latency_ms']:.2f} ms after prefill; prefill slows by "
        f"{100 * data['send_overhead']:.1f}% while sending; TP: {data['tp_scaling']}"
    )
    lines.append(
        f"overheads: dispatch {o['dispatch_ms']:.2f} ms, return {o['return_ms']:.2f} ms, "
        f"prefill x{o.get('prefill_scale', 1.0):.2f}, decode step +{excess} ms by batch "
        f"({o['source']})"
    )
    corun = data.get("corun_pairs")
    if corun:
        pairs = ", ".join(
            f"{pair.replace('|', ' beside ')} +{100 * v:.1f}%" for pair, v in corun.items()
        )
        lines.append(f"co-run on neighbouring cores: {pairs} (corun {data['corun']:.3f})")
    return "\n".join(lines)
