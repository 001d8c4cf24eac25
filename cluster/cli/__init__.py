"""The ``pdserve`` command line: a table of subcommands, each in its own module, loaded lazily.

``main`` lists every subcommand from ``COMMANDS`` without importing any of them (``pdserve
--help`` loads neither torch nor Ray), then imports only the chosen one's module, which adds
its flags and runs it. A subcommand module has two functions::

    add_args(command: str, parser: argparse.ArgumentParser) -> None   # flags, description
    run(command: str, args: argparse.Namespace) -> int                # the exit status

``command`` tells apart the subcommands one module serves (``up``/``status``/``down``). The
modules keep their own top-level imports light, so each ``pdserve X --help`` stays fast too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line, shown by `pdserve --help`
    module: str  # under pdserve.cluster.cli


COMMANDS = (
    Command("generate", "generate completions for prompts on the command line", "generate"),
    Command("demo", "ask the default model a few questions end to end (`make demo`)", "generate"),
    Command("up", "deploy onto a Ray cluster from a YAML spec and serve HTTP", "deploy"),
    Command("status", "show a deployment's pools, KV usage, queues and links", "deploy"),
    Command("down", "tear a deployment down (workers, links, HTTP server)", "deploy"),
    Command("submit", "submit a JSONL file of prompts as a batch job", "jobs"),
    Command("jobs", "list jobs, or wait for / fetch / cancel one", "jobs"),
    Command("bench", "measure latency, SLO attainment and goodput against a server", "bench"),
    Command(
        "sweep", "find each placement's goodput on a workload (SLO attainment vs rate)", "sweep"
    ),
    Command(
        "profile",
        "measure this hardware's prefill/decode/KV-transfer latencies and fit models",
        "profile",
    ),
    Command(
        "plan",
        "rank placements of N devices by simulated goodput; print the best deploy spec",
        "plan",
    ),
    Command(
        "eval-ppl",
        "perplexity and greedy agreement of dtypes, weight and KV-cache quantization",
        "eval_ppl",
    ),
    Command("make-tiny-model", "build a small random-weight model with a tokenizer", "tiny_model"),
)


class CommandModule(Protocol):
    def add_args(self, command: str, parser: argparse.ArgumentParser) -> None: ...

    def run(self, command: str, args: argparse.Namespace) -> int: ...


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and an empty subparser per command (its flags come with its module)."""
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Disaggregated prefill/decode LLM serving on Ray: a tensor-parallel prefill "
        "pool ships KV caches over torch.distributed to a data-parallel decode pool.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {c.name: sub.add_parser(c.name, help=c.help, description=c.help) for c in COMMANDS}
    return parser, subparsers


def load(command: str) -> CommandModule:
    """The module that serves `command` (imported now, not before)."""
    module = next(c.module for c in COMMANDS if c.name == command)
    return cast(CommandModule, importlib.import_module(f"{__name__}.{module}"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    # the top level has flags only, so the first word that is not one names the command
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen in subparsers:
        load(chosen).add_args(chosen, subparsers[chosen])
    args = parser.parse_args(argv)  # exits on --help or a bad command, as argparse does
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return load(args.command).run(args.command, args)
