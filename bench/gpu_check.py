"""`make gpu-check`: pdserve's GPU path checked on one GPU in at most 8 minutes.

Five steps, in order, each in a process of its own with a timeout carved from --budget-s (a
step that fails or times out is recorded as such and the next one runs):

  gpu-tests    the GPU-marked tests: pytest -m gpu tests/gpu (two-GPU cases skip on one GPU)
  parity       greedy parity with transformers on the default model
               (builtin:smollm2-135m-instruct) in bfloat16 and float32, on cuda
  kv-transfer  the KV link's same-device paths (host, cuda_ipc) against raw copy bandwidth
               (device-to-device, and device-to-pinned-host, of the same bytes)
  engine       pdserve's engine against transformers on cuda: decode and prefill tokens/s
  goodput      a 1-minute probe: 1P1D on one GPU (deploy/gpu-1x.yaml) vs colocated, ~30 s
               each at the same request rate; goodput of each and their ratio

After each step a one-line result is printed and the report rewritten in --out: gpu_check.json
(the machine, every step's status, seconds and figures), gpu_check.md (a summary table and a
section per step) and logs/<step>.log (each step's whole output). A run cut short still leaves
the steps that finished. Exit status: 0 when every step passed (or was skipped), 1 when one
failed or timed out, 2 without CUDA (said at once, before anything slow), 130 interrupted.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pdserve.bench.gpu_check_report import MARKDOWN_NAME
from pdserve.bench.gpu_check_runner import RESULT, Check, Step, terminate_as_interrupt

REPO = Path(__file__).resolve().parents[1]  # the checkout: tests/ and deploy/ live there
DEFAULT_BUDGET_S = 480.0
# name, title, share of the default budget in seconds (scaled with --budget-s): 470 s in all,
# leaving 10 s for starting up, killing a last step that overruns and writing the report. A
# step may also use what the steps before it left unused (gpu_check_runner).
STEPS = (
    # the GPU tests compile flex ~10 times (kernels, graphs, four small deployments)
    ("gpu-tests", "GPU-marked tests (pytest -m gpu tests/gpu)", 160.0),
    ("parity", "greedy parity with transformers, bfloat16 and float32", 60.0),
    ("kv-transfer", "KV transfer: same-device paths vs raw copy bandwidth", 30.0),
    ("engine", "engine benchmark against transformers", 60.0),
    ("goodput", "1-minute goodput probe: 1P1D vs colocated on one GPU", 160.0),
)
GPU_1X_SPEC = "deploy/gpu-1x.yaml"


def build_steps(python: str, scale: float = 1.0) -> list[Step]:
    """The steps' commands, run from the repository root with ``python`` (this interpreter)."""
    module = {
        "gpu-tests": (
            "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-p", "no:cacheprovider", "--timeout=120"
        ),
        "parity": ("-m", "pdserve.bench.gpu_check_parity", "--result", RESULT),
        "kv-transfer": ("-m", "pdserve.bench.gpu_check_kv", "--result", RESULT),
        "engine": ("-m", "pdserve.bench.gpu_check_engine", "--result", RESULT),
        "goodput": (
            "-m", "pdserve.bench.gpu_check_goodput", "--result", RESULT,
            "--spec", GPU_1X_SPEC, "--seconds", "30",
        ),
    }  # fmt: skip
    # -u: a step's output reaches its log as printed, so one killed at its timeout keeps it
    return [Step(n, title, (python, "-u", *module[n]), t * scale) for n, title, t in STEPS]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    names = [name for name, _, _ in STEPS]
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="each step's share of the default budget: "
        + ", ".join(f"{n} {t:.0f} s" for n, _, t in STEPS)
        + "; a step may also use what the steps before it left unused.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/gpu-check"),
        help="folder for the report and logs (default results/gpu-check; rewritten)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"the whole check's seconds (default {DEFAULT_BUDGET_S:g}); the steps' shares "
        "scale with it",
    )
    p.add_argument(
        "--skip",
        nargs="+",
        action="extend",
        default=[],
        choices=names,
        metavar="STEP",
        help=f"steps not to run (recorded as skipped): {', '.join(names)}",
    )
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    return args


def cuda_problem() -> str | None:
    """Why this machine cannot run the check, in one line that names the fix; None if it can.
    Imports torch, nothing heavier."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (
            f"gpu-check: torch {torch.__version__} in this environment is a CPU build: install "
            "a CUDA build of torch into .venv (e.g. .venv/bin/pip install torch --index-url "
            "https://download.pytorch.org/whl/cu128) and run `make gpu-check` on a GPU machine"
        )
    return (
        f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: run "
        "`make gpu-check` on a GPU machine whose driver works (nvidia-smi lists its GPUs)"
    )


def machine_facts() -> dict[str, Any]:
    """The GPU, library versions and commit the figures belong to."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "ray": _version("ray"),
        "python": platform.python_version(),
        "host": platform.node(),
        "commit": _commit(),
    }


def _commit() -> str | None:
    head = _run(["git", "rev-parse", "--short", "HEAD"])
    if head is None:
        return None
    clean = subprocess.run(
        ["git", "diff-index", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True
    )
    return head if clean.returncode == 0 else f"{head} (+ uncommitted changes)"


def _run(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    problem = cuda_problem()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    terminate_as_interrupt()
    out = args.out.resolve()
    machine = machine_facts()
    print(f"gpu-check: {machine['gpu']} x{machine['gpu_count']}, torch {machine['torch']} "
          f"(CUDA {machine['cuda']}), commit {machine['commit']}; report in {out}", flush=True)  # fmt: skip
    check = Check(out, args.budget_s, machine, REPO, started=started)
    steps = build_steps(sys.executable, args.budget_s / DEFAULT_BUDGET_S)
    try:
        results = check.run(steps, args.skip)
    except KeyboardInterrupt:
        print(f"gpu-check interrupted: the steps that finished are in {out / MARKDOWN_NAME}")
        return 130
    failed = [r.name for r in results if not r.ok]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "every step passed"
    print(f"gpu-check {verdict} ({check.elapsed_s:.0f} s); summary: {out / MARKDOWN_NAME}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
