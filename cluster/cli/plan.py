"""``pdserve plan``: its flags and run live in the planner's room, ``bench.plan.cli``."""

from __future__ import annotations

import argparse

from pdserve.bench.plan.cli import add_plan_args, run_plan

DESCRIPTION = (
    "Simulate placements (colocated x k; disaggregated with prefill TP, prefill and decode "
    "counts) with a discrete-event model built on a profile, bisect each one's goodput, rank by "
    "goodput per device and print the best as a deploy spec. --compare checks the simulator "
    "against a sweep's results.json."
)


def add_args(command: str, p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_plan_args(p)


def run(command: str, args: argparse.Namespace) -> int:
    return run_plan(args)
