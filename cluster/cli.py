"""The ``pdserve`` command line. Heavy modules (Ray, torch) load only for the verbs that need them."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pdserve.bench.plan.cli import add_plan_args
from pdserve.bench.profile.cli import add_profile_args
from pdserve.bench.serve.cli import add_bench_args
from pdserve.bench.sweep.cli import add_sweep_args
from pdserve.cluster.job_commands import add_jobs_args, add_submit_args

# engine.tiny_model.TINY_ARCHS, spelled out so `--help` does not import torch (a test keeps them equal)
TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")

DEMO_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "Disaggregated serving splits prefill and decode because",
)
DEFAULT_DEPLOYMENT = "local"


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model directory (default: the built-in tiny model)",
    )
    p.add_argument("--prefill-tp", type=int, default=1, help="tensor-parallel size of prefill")
    p.add_argument("--decode-instances", type=int, default=1, help="decode replicas")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--ray-address",
        default=None,
        help="connect to this Ray cluster (default: start a local one)",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="per-request seed for sampling")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens whatever")


def _add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--file",
        default=None,
        help="deploy spec YAML (default: the embedded deploy/local.yaml)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to deploy onto ('auto' = the running one); default: the "
        "spec's ray.address, else a local Ray instance that lives as long as `up`",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="return once serving (needs a running Ray cluster: --address)",
    )


def _add_name_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n",
        "--name",
        default=DEFAULT_DEPLOYMENT,
        help=f"deployment name, the spec's `name` (default: {DEFAULT_DEPLOYMENT})",
    )
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Disaggregated prefill/decode LLM serving on Ray: a tensor-parallel prefill "
        "pool ships KV caches over torch.distributed to a data-parallel decode pool.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "generate",
        help="generate completions for prompts on the command line",
        description="Start a local cluster, run the prompts, print completions.",
    )
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _add_engine_args(p)
    _add_sampling_args(p)

    p = sub.add_parser(
        "demo",
        help="run the built-in tiny model end to end (`make demo`)",
        description="Builds the tiny random-weight model (cached), starts a local "
        "cluster, streams a few completions and prints TTFT, TPOT and KV bytes. "
        "The tiny model's weights are random: its text is gibberish by design.",
    )
    _add_engine_args(p)
    p.add_argument("--max-tokens", type=int, default=24)

    p = sub.add_parser(
        "up",
        help="deploy onto a Ray cluster from a YAML spec and serve HTTP",
        description="Validate the deploy spec, place each prefill instance's TP "
        "ranks in a STRICT_PACK placement group and the decode replicas on the "
        "decode resources, and serve the OpenAI-compatible and native APIs.",
    )
    _add_up_args(p)
    p = sub.add_parser("status", help="show a deployment's pools, KV usage, queues and links")
    _add_name_args(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p = sub.add_parser("down", help="tear a deployment down (workers, links, HTTP server)")
    _add_name_args(p)

    p = sub.add_parser(
        "submit",
        help="submit a JSONL file of prompts as a batch job",
        description="Submit prompts as a job that runs on the cluster; results are "
        "written there as they complete, so you can disconnect and fetch them later.",
    )
    add_submit_args(p)
    p = sub.add_parser("jobs", help="list jobs, or wait for / fetch / cancel one")
    add_jobs_args(p)

    p = sub.add_parser(
        "bench",
        help="measure latency, SLO attainment and goodput against a server",
        description="Replay a workload against an OpenAI-compatible server at a "
        "request rate and report TTFT/TPOT/ITL/E2E, SLO attainment and goodput "
        "(the result block of `vllm bench serve`).",
    )
    add_bench_args(p)

    p = sub.add_parser(
        "sweep",
        help="find each placement's goodput on a workload (SLO attainment vs rate)",
        description="For each placement of an experiment (colocated, 1P1D, 2P1D, ...): deploy, "
        "warm up, bisect the highest request rate meeting the SLO attainment target, tear "
        "down. Writes results.json, probes.csv, per-request records and plots.",
    )
    add_sweep_args(p)

    p = sub.add_parser(
        "profile",
        help="measure this hardware's prefill/decode/KV-transfer latencies and fit models",
        description="Load the spec's model on its device with its thread count, time the real "
        "engine code (prefill vs batch tokens and TP, decode step vs batch and context, KV "
        "transfer over a real link, per-request overheads), fit latency models, write JSON.",
    )
    add_profile_args(p)
    p = sub.add_parser(
        "plan",
        help="rank placements of N devices by simulated goodput; print the best deploy spec",
        description="Simulate placements (colocated x k; disaggregated with prefill TP, prefill "
        "and decode counts) with a discrete-event model built on a profile, bisect each one's "
        "goodput, rank by goodput per device and print the best as a deploy spec. --compare "
        "checks the simulator against a sweep's results.json.",
    )
    add_plan_args(p)

    p = sub.add_parser(
        "make-tiny-model",
        help="build a small random-weight model with a tokenizer",
        description="Writes config.json, model.safetensors and a byte-level BPE "
        "tokenizer with a chat template; deterministic from the seed.",
    )
    p.add_argument("out_dir", help="directory to write")
    p.add_argument("--arch", choices=TINY_ARCHS, default="llama")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "make-tiny-model":
        from pdserve.engine.tiny_model import make_tiny_model

        print(make_tiny_model(args.out_dir, args.arch, args.seed))
        return 0
    if args.command in ("submit", "jobs"):
        from pdserve.cluster import job_commands

        run = job_commands.run_submit if args.command == "submit" else job_commands.run_jobs
        return run(args)
    if args.command == "bench":
        from pdserve.bench.serve.cli import run_bench

        return run_bench(args)
    if args.command == "sweep":
        from pdserve.bench.sweep.cli import run_sweep_command

        return run_sweep_command(args)
    if args.command in ("profile", "plan"):
        from pdserve.bench.plan.cli import run_plan
        from pdserve.bench.profile.cli import run_profile

        return run_profile(args) if args.command == "profile" else run_plan(args)
    if args.command in ("up", "status", "down"):
        from pdserve.cluster import deploy_commands  # Ray and torch from here on

        return int(getattr(deploy_commands, args.command)(args))
    from pdserve.cluster import commands

    if args.command == "generate":
        return commands.generate(args)
    return commands.demo(args, DEMO_PROMPTS)


def model_or_default(model: str | None) -> str:
    from pdserve.engine.tiny_model import default_tiny_model

    return model if model is not None else str(default_tiny_model())


if __name__ == "__main__":
    sys.exit(main())
