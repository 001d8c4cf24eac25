"""`pdserve profile -f SPEC`: measure the spec's model on this hardware and fit latency models.

Loads the spec's model on the spec's device with the spec's thread count and times the real
engine code in-process (no Ray): prefill batches of several compositions (TP 1 here; TP > 1
with real process groups across spawned ranks), decode steps over batch size x context through
the paged path, KV transfers over a real link to a receiver process, and prefill while sending
its KV. Optionally (the default without --quick) it measures the fixed per-request costs
through a real local deployment over HTTP. It fits the models of `bench.latency_model`, prints
their quality and writes everything, raw samples included, as JSON (`bench.profile_model`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PREFILL_LENGTHS = (16, 64, 256, 1024, 4096)
DECODE_CONTEXTS = (32, 128, 512, 2048)
DENSE_BATCHES = 32  # decode batch sizes measured one by one up to this
TRANSFER_MIB = (0.25, 1, 4, 16, 64)  # one transfer's KV bytes, whatever the model's size


@dataclass(frozen=True)
class Grid:
    """What to measure: prefill batch compositions, decode (batch, context) points, transfer
    sizes (tokens of KV), and the compositions timed again while sending KV."""

    prefill: list[list[int]]
    decode: list[tuple[int, int]]
    transfer: list[int]
    send: list[list[int]]
    mixed: list[tuple[int, int, int, int]]  # (batch, context, chunk start, chunk length)
    repeats: int
    decode_steps: int

    @classmethod
    def build(
        cls,
        max_tokens: int,
        max_len: int,
        max_batch: int,
        max_seqs: int,
        kv_bytes_per_token: int,
        quick: bool,
    ) -> Grid:
        """Prefill: n prompts of length L for L in PREFILL_LENGTHS and n = 1, 2, 4, ... within
        the token budget, plus three mixed batches; decode: batch 1, 2, 4, ... x contexts and
        every batch size up to DENSE_BATCHES at a context near 128; transfers of TRANSFER_MIB
        each."""
        lens = [n for n in PREFILL_LENGTHS if n < max_len and n <= max_tokens]
        counts = [1 << i for i in range(12) if (1 << i) <= max_batch]
        prefill = [[n] * k for n in lens for k in counts if n * k <= max_tokens]
        rng = np.random.default_rng(0)
        for size in (3, 6, 12):
            lens_mix = [int(x) for x in rng.integers(8, max(9, min(max_len - 1, 1024)), size)]
            while sum(lens_mix) > max_tokens and len(lens_mix) > 1:
                lens_mix.pop()
            prefill.append(lens_mix)
        steps = 3 if quick else 8
        contexts = [c for c in DECODE_CONTEXTS if c + steps + 2 < max_len]
        batches = [1 << i for i in range(12) if (1 << i) <= max_seqs]
        decode = [(b, c) for b in batches for c in contexts]
        # every other batch size up to DENSE_BATCHES at one context: a step's cost is not
        # monotonic in the batch on CPU BLAS (measured: batch 3 slower than 4, 6-7 than 8)
        mid = min(contexts, key=lambda c: abs(c - 128)) if contexts else None
        if mid is not None and not quick:
            dense = range(1, min(max_seqs, DENSE_BATCHES) + 1)
            decode += [(b, mid) for b in dense if b not in batches]
        transfer = [max(1, round(mib * 2**20 / kv_bytes_per_token)) for mib in TRANSFER_MIB]
        send = [c for c in ([256], [64] * 4, [1024]) if sum(c) <= max_tokens and max(c) < max_len]
        mixed = [
            (b, c, s, n)
            for b, c, s, n in ((8, 256, 0, 128), (8, 256, 256, 128), (4, 512, 0, 512))
            if b <= max_seqs and max(c, s + n) + steps + 2 < max_len and n <= max_tokens
        ]
        if quick:
            prefill = [c for c in prefill if sum(c) <= 256][:10]
            decode = [(b, c) for b, c in decode if b <= 8 and c <= 128]
            transfer, send, mixed = transfer[:4], send[:1] or [[min(16, max_len - 1)]], mixed[:1]
        repeats = 1 if quick else 3
        return cls(prefill, decode, transfer, send or [[lens[0]]], mixed, repeats, steps)


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
    from pdserve.bench.profile_runner import ProfileSetupError, profile_spec

    try:
        profile = profile_spec(args)
    except ProfileSetupError as e:
        print(f"pdserve profile: error: {e}", file=sys.stderr)
        return 2
    profile.save(args.out)
    print(format_quality(profile.to_json()))
    print(f"\nwrote {args.out}")
    return 0


def median_by_key(samples: Sequence[tuple[Any, float]]) -> list[tuple[Any, float]]:
    """Median ms per key, keys in first-seen order (repeats were interleaved)."""
    groups: dict[Any, list[float]] = {}
    for key, ms in samples:
        groups.setdefault(key, []).append(ms)
    return [(key, statistics.median(v)) for key, v in groups.items()]


def interleaved(
    keys: Sequence[Any], repeats: int, measure: Callable[[Any], float], tick: Callable[[], None]
) -> list[tuple[Any, float]]:
    """Every key once per round, `repeats` rounds: load changes hit all keys alike."""
    out = []
    for _ in range(repeats):
        for key in keys:
            out.append((key, measure(key)))
            tick()
    return out


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


def cpu_count() -> int:
    return os.cpu_count() or 1
