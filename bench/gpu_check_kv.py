"""KV transfer on one GPU: the KV link's same-device paths against raw copy bandwidth,
``make gpu-check``'s kv-transfer step.

For each backend (default ``host`` and ``cuda_ipc``) ``micro.kv_bench`` moves one request's KV
between two processes on one device, as a prefill rank and a decode replica sharing a GPU do:
the whole protocol, received into a paged cache, checked to land as sent. The baselines are
what the hardware does with the same bytes in one process and no protocol: a device-to-device
copy (cuda_ipc's path is such copies, into the receiver's staging ring and out of it) and a
copy from the device into pinned host memory (the first half of host's path). Figures: GB/s of
kv_bench's ``pdserve`` mode (cold: every byte ready when the header goes) and ``streamed`` mode
(header ahead, as a prefill sends it), and each over the two baselines.

    python -m pdserve.bench.gpu_check_kv                           # cuda: host and cuda_ipc
    python -m pdserve.bench.gpu_check_kv --device cpu --backends gloo host --tokens 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from pdserve.bench.gpu_check_runner import write_result
from pdserve.bench.micro.kv_bench import Shape, Wire, run

COPY_REPEATS = 10


def copy_gbps(nbytes: int, device: torch.device) -> dict[str, float]:
    """GB/s (bytes copied per second, median of ``COPY_REPEATS``) of copying ``nbytes`` on the
    device (``d2d``) and from it into pinned host memory (``d2h``; plain memory on CPU)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    return {
        "d2d": _rate(lambda: dst.copy_(src), nbytes, device),
        "d2h": _rate(lambda: host.copy_(src, non_blocking=True), nbytes, device),
    }


def _rate(copy: Callable[[], object], nbytes: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    copy()  # warm-up
    sync()
    seconds = []
    for _ in range(COPY_REPEATS):
        start = time.perf_counter()
        copy()
        sync()
        seconds.append(time.perf_counter() - start)
    return nbytes / statistics.median(seconds) / 1e9


def measure(
    backends: Sequence[str], shape: Shape, tokens: list[int], device: str, repeats: int
) -> dict[str, Any]:
    """Each backend's kv_bench figures (or its error) and the copy baselines, per length."""
    out: dict[str, Any] = {"shape": asdict(shape), "device": device, "backends": {}}
    out["copy"] = {n: copy_gbps(n * shape.bytes_per_token(), torch.device(device)) for n in tokens}
    for backend in backends:
        start = time.perf_counter()
        try:
            figures = run(shape, tokens, repeats, wire=Wire(backend, device))
        except Exception as e:  # one backend failing still leaves the others' figures
            out["backends"][backend] = {"error": f"{type(e).__name__}: {e}"}
        else:
            out["backends"][backend] = {"results": {str(n): figures[n] for n in tokens}}
        out["backends"][backend]["seconds"] = time.perf_counter() - start
        print(f"{backend}: {_line(out, backend, tokens[-1])}", flush=True)
    return out


def _line(out: dict[str, Any], backend: str, n: int) -> str:
    entry = out["backends"][backend]
    if "error" in entry:
        return f"FAILED ({entry['error']})"
    r, copy = entry["results"][str(n)], out["copy"][n]
    return (
        f"{r['pdserve']:.1f} GB/s ({r['pdserve'] / copy['d2d']:.2f}x D2D "
        f"{copy['d2d']:.0f}, {r['pdserve'] / copy['d2h']:.2f}x D2H {copy['d2h']:.1f}; "
        f"wire {r.get('backend', backend)})"
    )


def markdown(out: dict[str, Any], tokens: list[int]) -> str:
    s = out["shape"]
    lines = [
        f"KV of {s['layers']} layers x {s['kv_heads']} heads x {s['head_dim']} ({s['dtype']}), "
        f"both processes on one {out['device']} device; GB/s, medians. Baselines in one "
        "process: D2D = device-to-device copy, D2H = device to pinned host memory.",
        "",
        "| backend | tokens | MiB | pdserve | streamed | D2D | D2H | pdserve/D2D | pdserve/D2H |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend, entry in out["backends"].items():
        if "error" in entry:
            lines.append(f"| {backend} | failed: {entry['error']} | | | | | | | |")
            continue
        for n in tokens:
            r, c = entry["results"][str(n)], out["copy"][n]
            lines.append(
                f"| {r.get('backend', backend)} | {n} | {r['bytes'] / 2**20:.0f} | "
                f"{r['pdserve']:.1f} | {r['streamed']:.1f} | {c['d2d']:.0f} | {c['d2h']:.1f} | "
                f"{r['pdserve'] / c['d2d']:.3f} | {r['pdserve'] / c['d2h']:.2f} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.gpu_check_kv",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backends", nargs="+", default=["host", "cuda_ipc"], help="KV link backends")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="prompt lengths")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per case (median)")
    p.add_argument("--result", help="write the figures here as JSON (gpu_check's step result)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shape = Shape(dtype=args.dtype)  # kv_bench's: 24 layers, 8 KV heads of 64
    out = measure(args.backends, shape, args.tokens, args.device, args.repeats)
    n = args.tokens[-1]
    summary = f"{n} tokens: " + "; ".join(f"{b} {_line(out, b, n)}" for b in out["backends"])
    print(summary)
    if args.result:
        write_result(
            args.result, out | {"summary": summary, "markdown": markdown(out, args.tokens)}
        )
    return 1 if any("error" in e for e in out["backends"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
