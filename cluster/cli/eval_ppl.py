"""``pdserve eval-ppl``: its flags and run live in the quality room, ``bench.quality.cli``."""

from __future__ import annotations

import argparse

from pdserve.bench.quality.cli import __doc__ as DESCRIPTION
from pdserve.bench.quality.cli import add_args as add_quality_args
from pdserve.bench.quality.cli import run as run_quality


def add_args(command: str, p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_quality_args(p)


def run(command: str, args: argparse.Namespace) -> int:
    return run_quality(args)
