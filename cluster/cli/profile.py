"""``pdserve profile``: its flags and run live in the profile room, ``bench.profile.cli``."""

from __future__ import annotations

import argparse

from pdserve.bench.profile.cli import add_profile_args, run_profile

DESCRIPTION = (
    "Load the spec's model on its device with its thread count, time the real engine code "
    "(prefill vs batch tokens and TP, decode step vs batch and context, KV transfer over a real "
    "link, per-request overheads), fit latency models, write JSON."
)


def add_args(command: str, p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_profile_args(p)


def run(command: str, args: argparse.Namespace) -> int:
    return run_profile(args)
