"""`pdserve sweep` flags and entry point. Importing this module stays light (`--help` is fast):
Ray, torch and matplotlib load inside `run_sweep_command` only."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: these import Ray, torch or rich
    from rich.console import Console

    from pdserve.bench.sweep.experiment import Experiment
    from pdserve.bench.sweep.results import SweepResults

SWEEP_EPILOG = """\
examples:
  pdserve sweep -f deploy/experiments/cpu.yaml
  pdserve sweep -f deploy/experiments/cpu.yaml --placements colocated-1 --num-prompts 20
  pdserve sweep --plot-only results/cpu-smollm2
The experiment file format: docs/experiments.md."""


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = SWEEP_EPILOG
    p.add_argument("-f", "--file", type=Path, default=None, help="EXPERIMENT.yaml to run")
    p.add_argument(
        "--plot-only",
        type=Path,
        default=None,
        metavar="RESULTS_DIR",
        help="redraw the plots from RESULTS_DIR/results.json; run nothing",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="results folder (default: the experiment's output_dir, else results/NAME)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace results already there")
    p.add_argument(
        "--placements", default="", metavar="A,B", help="run only these placements (by name)"
    )
    p.add_argument(
        "--workloads", default="", metavar="A,B", help="run only these workloads (by name)"
    )
    p.add_argument("--num-prompts", type=int, default=None, help="requests per probe, overriding")
    p.add_argument("--max-probes", type=int, default=None, help="probes per search, overriding")


def run_sweep_command(args: argparse.Namespace) -> int:
    """0 on success, 2 on a bad experiment or results folder, 130 on Ctrl-C."""
    from rich.console import Console

    console = Console(stderr=True)
    if args.plot_only is not None:
        return _plot_only(args.plot_only, console)
    if args.file is None:
        console.print("[red]pdserve sweep[/]: give -f EXPERIMENT.yaml (or --plot-only DIR)")
        return 2
    from pdserve.bench.sweep.experiment import ExperimentError
    from pdserve.bench.sweep.experiment_loader import load_experiment

    try:
        experiment = load_experiment(args.file).narrowed(
            _names(args.placements), _names(args.workloads), args.num_prompts, args.max_probes
        )
    except ExperimentError as e:
        console.print(f"[red]invalid experiment[/]:\n{e}", highlight=False)
        return 2
    out_dir = args.output or experiment.output_dir
    if (out_dir / "results.json").exists() and not args.overwrite:
        console.print(
            f"[red]{out_dir} holds results already[/]: pass --overwrite or -o ANOTHER_DIR"
        )
        return 2
    shutil.rmtree(out_dir / "records", ignore_errors=True)
    return _sweep(experiment, out_dir, console)


def _sweep(experiment: Experiment, out_dir: Path, console: Console) -> int:
    from pdserve.bench.serve.runner import BenchError
    from pdserve.bench.serve.traces import TraceFormatError
    from pdserve.bench.serve.workloads import WorkloadError
    from pdserve.bench.sweep.plots import plot_all
    from pdserve.bench.sweep.runner import run_sweep
    from pdserve.cluster.config.spec import SpecError

    try:
        results = run_sweep(experiment, out_dir, console)
    except KeyboardInterrupt:
        console.print(f"interrupted: partial results in {out_dir} (plot them with --plot-only)")
        return 130
    except (SpecError, BenchError, WorkloadError, TraceFormatError) as e:
        console.print(f"[red]pdserve sweep[/]: {e}\npartial results in {out_dir}", highlight=False)
        return 2
    for path in plot_all(results, out_dir):
        console.print(f"wrote {path}", highlight=False)
    _print_summary(results, console)
    return 0


def _plot_only(results_dir: Path, console: Console) -> int:
    from pdserve.bench.sweep.plots import plot_all
    from pdserve.bench.sweep.results import load_results

    try:
        results = load_results(results_dir)
    except FileNotFoundError as e:
        console.print(f"[red]pdserve sweep[/]: {e}", highlight=False)
        return 2
    for path in plot_all(results, results_dir):
        print(path)
    return 0


def _print_summary(results: SweepResults, console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"{results.experiment}: goodput at {results.target:.0%} SLO attainment")
    for column in ("placement", "devices", "workload", "goodput (req/s)", "per device", "probes"):
        table.add_column(column)
    for p in results.placements:
        for name, w in p.workloads.items():
            bound = "≥ " if w.saturated else ""
            table.add_row(
                p.name,
                str(p.devices),
                name,
                f"{bound}{w.goodput:.3g}",
                f"{bound}{w.goodput / p.devices:.3g}",
                str(len(w.probes)),
            )
    console.print(table)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]
