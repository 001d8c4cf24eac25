"""``pdserve bench``: its flags and run live in the serving benchmark, ``bench.serve.cli``."""

from __future__ import annotations

import argparse

from pdserve.bench.serve.cli import add_bench_args, run_bench

DESCRIPTION = (
    "Replay a workload against an OpenAI-compatible server at a request rate and report "
    "TTFT/TPOT/ITL/E2E, SLO attainment and goodput (the result block of `vllm bench serve`)."
)


def add_args(command: str, p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_bench_args(p)


def run(command: str, args: argparse.Namespace) -> int:
    return run_bench(args)
