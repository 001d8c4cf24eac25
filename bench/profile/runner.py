"""The measuring half of `pdserve profile` (imports torch): run the grid, fit, build a Profile."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from pdserve.bench.machine import machine_facts
from pdserve.bench.models import num_params
from pdserve.bench.plan.latency_model import TransferModel, fit_decode, fit_prefill
from pdserve.bench.plan.profile_model import ModelShape, Overheads, Profile
from pdserve.bench.profile.corun import measure_corun
from pdserve.bench.profile.dist import LinkBench, TPPrefillBench
from pdserve.bench.profile.grid import Grid, cpu_count, interleaved, median_by_key
from pdserve.bench.profile.overheads import DEFAULT_OVERHEADS, measure_overheads
from pdserve.bench.profile.timers import DecodeTimer, PrefillTimer, Target
from pdserve.cluster.config.resolve import auto_kv_cache, resolve
from pdserve.cluster.config.spec import SpecError, default_spec_path, load_spec
from pdserve.engine.deploy_config import KVCacheSize, PrefillSettings
from pdserve.engine.kv_cache import bytes_per_block
from pdserve.engine.parallel import TPGroup, check_tp_size
from pdserve.prefill_worker.runner import PrefillRunner


class ProfileSetupError(ValueError):
    """The spec cannot be profiled here; the message says what to change."""


def profile_spec(args: argparse.Namespace) -> Profile:
    try:
        source = _spec_source(args)
        spec = load_spec(source)
        resolved = resolve(spec, gpus_available=torch.cuda.is_available())
    except SpecError as e:
        raise ProfileSetupError(str(e)) from None
    started = time.perf_counter()
    target = Target.load(resolved)
    shape = _shape(spec, target)
    pool, decode = resolved.prefill or PrefillSettings(), resolved.decode
    grid = Grid.build(
        min(args.max_prefill_tokens, pool.max_batch_tokens), target.config.max_model_len,
        pool.max_batch_size, decode.max_num_seqs, shape.kv_bytes_per_token(), args.quick,
    )  # fmt: skip
    tps = _tp_degrees(args.max_tp or spec.prefill_pool.tensor_parallel_size, target)
    total = (
        grid.repeats * (len(grid.prefill) * len(tps) + len(grid.transfer) + 2 * len(grid.send))
        + len(grid.decode)
        + grid.repeats * len(grid.mixed)
    )
    with tqdm(total=total, desc=f"profiling {shape.name}", unit="run") as bar:
        samples = _measure(target, _kv_blocks(target, decode.kv_cache), grid, tps, bar)
    prefill = {tp: fit_prefill(median_by_key(s)) for tp, s in samples["prefill"].items()}
    decode_fit = fit_decode(samples["decode_points"])
    transfer = TransferModel.fitted(median_by_key(samples["transfer"]))
    send_overhead, land_ms = _send_costs(samples["send"])
    profile = Profile(
        shape, prefill, decode_fit, transfer, DEFAULT_OVERHEADS, send_overhead,
        _kv_blocks(target, auto_kv_cache(target.device.type)), land_ms, target.device.type,
        target.threads,
        _hardware(target), _as_written(source),
        _raw(samples), _tp_note(tps),
    )  # fmt: skip
    if (args.overheads or ("default" if args.quick else "measure")) == "measure":
        profile = _with_overheads(profile, spec)
    profile = _with_mixed_check(profile, samples["mixed"])
    profile = _with_corun(profile, target, args.quick)
    return _stamped(profile, time.perf_counter() - started)


def _spec_source(args: argparse.Namespace) -> Path | dict[str, Any]:
    """-f SPEC, or the deploy spec a sweep experiment runs its placements with (its model and
    thread count), or deploy/local.yaml."""
    if args.experiment is None:
        return Path(args.file or default_spec_path())
    if args.file is not None:
        raise ProfileSetupError("give -f SPEC or --experiment EXPERIMENT.yaml, not both")
    from pdserve.bench.models import servable_model
    from pdserve.bench.sweep.experiment import ExperimentError, Placement, placement_deploy_spec
    from pdserve.bench.sweep.experiment_loader import load_experiment

    try:
        e = load_experiment(args.experiment)
    except ExperimentError as err:
        raise ProfileSetupError(str(err)) from None
    model = str(servable_model(e.model_bench)) if e.model_bench else e.model_path
    one = Placement("profile", "disaggregated", 1, 1, 1)
    return placement_deploy_spec(
        e.base_deploy, one, model_path=model, threads=e.threads_per_device, port=8000
    )


def _as_written(source: Path | dict[str, Any]) -> dict[str, Any]:
    """The spec as its author wrote it (sizes like "256MiB" stay readable in plan's output)."""
    if isinstance(source, dict):
        return source
    data = yaml.safe_load(source.read_text())
    return dict(data)


def _measure(
    target: Target, num_blocks: int, grid: Grid, tps: Sequence[int], bar: tqdm
) -> dict[str, Any]:
    tick = bar.update
    max_tokens = max(sum(c) for c in grid.prefill + grid.send)
    timer = PrefillTimer(target, max_tokens, max(len(c) for c in grid.prefill + grid.send))
    comps = [tuple(c) for c in grid.prefill]
    timer(list(comps[0]))  # warm-up
    out: dict[str, Any] = {"prefill": {1: interleaved(comps, grid.repeats, timer, tick)}}
    out |= _decode_samples(target, num_blocks, grid, tick)
    out["transfer"], out["send"] = _link_samples(target, grid, timer, max_tokens, tick)
    for tp in tps[1:]:
        bench = TPPrefillBench(target.deployment.model, tp)
        try:
            bench(list(comps[0]))  # warm-up
            out["prefill"][tp] = interleaved(comps, grid.repeats, bench, tick)
        finally:
            bench.close()
    return out


def _decode_samples(
    target: Target, num_blocks: int, grid: Grid, tick: Callable[[], None]
) -> dict[str, Any]:
    """Decode steps over the spec's KV cache size (freed on return), and mixed steps."""
    decode = DecodeTimer(target, num_blocks * target.block_size)
    out: dict[str, Any] = {"decode": [], "decode_points": []}
    for b, c in grid.decode:
        if decode.fits(b, c, grid.decode_steps):
            steps = decode(b, c, grid.decode_steps)
            out["decode"] += steps
            out["decode_points"].append(_point(b, [(ctx, ms) for _, ctx, ms in steps]))
        tick()
    mixed = interleaved(grid.mixed, grid.repeats, lambda m: decode.mixed(*m)[1], tick)
    out["mixed"] = median_by_key(mixed)
    return out


def _link_samples(
    target: Target, grid: Grid, plain: PrefillTimer, max_tokens: int, tick: Callable[[], None]
) -> tuple[list[tuple[int, float]], list[tuple[tuple[int, ...], float, float, float]]]:
    link = LinkBench(
        target.config, target.block_size, max(max_tokens, *grid.transfer),
        target.threads,
    )  # fmt: skip
    try:
        bpt = target.config.kv_bytes_per_token(1)
        link.transfer_ms(grid.transfer[0])  # warm-up
        transfer = [
            (n * bpt, ms)
            for n, ms in interleaved(grid.transfer, grid.repeats, link.transfer_ms, tick)
        ]
        runner = PrefillRunner(target.model, TPGroup.single(), target.device, target.block_size)
        send = []
        for _ in range(grid.repeats):
            for comp in grid.send:
                busy, landed = link.prefill_send(runner, target.prompts(comp))
                send.append((tuple(comp), busy, landed, plain(comp)))
                tick()
                tick()
    finally:
        link.close()
    return transfer, send


def _send_costs(send: Sequence[tuple[tuple[int, ...], float, float, float]]) -> tuple[float, float]:
    """(share prefill slows by while sending, ms from the sends' end to the KV landing)."""
    ratio = statistics.median(busy / plain for _, busy, _, plain in send)
    land = statistics.median(landed - busy for _, busy, landed, _ in send)
    return max(0.0, ratio - 1.0), max(0.0, land)


def _point(b: int, steps: Sequence[tuple[int, float]]) -> tuple[int, int, float]:
    """One decode run as a fit sample: mean Σcontext over its steps, median step time."""
    ctx = round(statistics.mean(c for c, _ in steps))
    return b, ctx, statistics.median(ms for _, ms in steps)


def _shape(spec: Any, target: Target) -> ModelShape:
    c = target.config
    name = spec.model.served_name if spec.model.served_name != "auto" else spec.model.path
    return ModelShape(
        name, c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
        c.head_dim, c.dtype.itemsize, c.max_model_len, num_params(target.model),
    )  # fmt: skip


def _kv_blocks(target: Target, kv: KVCacheSize) -> int:
    """Blocks a decode replica's cache of size `kv` gets here (the deployment's own rule)."""
    kv_dtype = target.deployment.decode.kv_cache.dtype
    per_block = bytes_per_block(target.config, 1, target.block_size, kv_dtype)
    memory = torch.cuda.mem_get_info(target.device) if target.device.type == "cuda" else None
    return kv.num_blocks(per_block, memory)


def _tp_degrees(limit: int, target: Target) -> list[int]:
    devices = torch.cuda.device_count() if target.device.type == "cuda" else cpu_count()
    out, tp = [1], 2
    while tp <= min(limit, devices):
        try:
            check_tp_size(target.config.num_heads, target.config.num_kv_heads, tp)
            out.append(tp)
        except ValueError:
            pass
        tp *= 2
    return out


def _tp_note(tps: Sequence[int]) -> str:
    measured = ", ".join(str(t) for t in tps)
    return (
        f"measured: TP {measured}; other degrees modeled from TP 1 (work terms / tp, fixed "
        "terms kept, 2 all-reduces a layer at the link bandwidth)"
    )


def _hardware(target: Target) -> dict[str, Any]:
    facts = machine_facts(target.threads)
    if target.device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(target.device)
        facts["gpu_count"] = torch.cuda.device_count()
    return facts


def _raw(samples: dict[str, Any]) -> dict[str, Any]:
    return {
        "prefill": {
            str(tp): [{"lens": list(c), "ms": ms} for c, ms in s]
            for tp, s in samples["prefill"].items()
        },
        "decode": [{"batch": b, "context_sum": c, "ms": ms} for b, c, ms in samples["decode"]],
        "transfer": [{"bytes": b, "ms": ms} for b, ms in samples["transfer"]],
        "send": [
            {"lens": list(c), "busy_ms": b, "landed_ms": land, "plain_ms": p}
            for c, b, land, p in samples["send"]
        ],
    }


def _with_overheads(profile: Profile, spec: Any) -> Profile:
    from dataclasses import replace

    def busy(lens: list[int]) -> float:
        return profile.prefill_ms(lens) * (1 + profile.send_overhead)

    overheads: Overheads = measure_overheads(spec, busy, profile.decode_ms, profile.land_ms)
    return replace(profile, overheads=overheads)


def _with_mixed_check(profile: Profile, mixed: Sequence[Any]) -> Profile:
    """Chunked-prefill steps as measured and as the composed model predicts them (a check of
    `Profile.step_ms`, not fitted)."""
    from dataclasses import replace

    engine_only = replace(profile, overheads=Overheads())  # in-process: no deployment costs
    rows = [
        {"batch": b, "context": c, "chunk": [s, s + n], "ms": ms,
         "predicted_ms": engine_only.step_ms(b, b * (c + 1), [(s, s + n)])}
        for (b, c, s, n), ms in mixed
    ]  # fmt: skip
    return replace(profile, samples={**profile.samples, "mixed": rows})


def _with_corun(profile: Profile, target: Target, quick: bool) -> Profile:
    """On a CPU host with a core per worker to spare: the co-run slowdown (bench.profile.corun)."""
    from dataclasses import replace

    if target.device.type != "cpu" or cpu_count() < 2:
        return profile
    print("measuring how two workers on this host slow each other down…", flush=True)
    measured = measure_corun(target, *((0.2, 1) if quick else (1.0, 3)))
    pairs = {k: v for k, v in measured.items() if "|" in k}
    return replace(profile, corun=measured["corun"], corun_pairs=pairs)


def _stamped(profile: Profile, seconds: float) -> Profile:
    from dataclasses import replace

    hardware = {**profile.hardware, "profile_seconds": round(seconds, 1)}
    return replace(profile, hardware=hardware)
