"""``pdserve sweep``: its flags and run live in the sweep room, ``bench.sweep.cli``."""

from __future__ import annotations

import argparse

from pdserve.bench.sweep.cli import add_sweep_args, run_sweep_command

DESCRIPTION = (
    "For each placement of an experiment (colocated, 1P1D, 2P1D, ...): deploy, warm up, bisect "
    "the highest request rate meeting the SLO attainment target, tear down. Writes "
    "results.json, probes.csv, per-request records and plots."
)


def add_args(command: str, p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_sweep_args(p)


def run(command: str, args: argparse.Namespace) -> int:
    return run_sweep_command(args)
