"""The ``pdserve`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pdserve.engine.tiny_model import TINY_ARCHS, default_tiny_model, make_tiny_model

DEMO_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "Disaggregated serving splits prefill and decode because",
)


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
        help="generate completions for prompts given on the command line",
        description="Start a local cluster, run the prompts, print completions.",
    )
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _add_engine_args(p)
    _add_sampling_args(p)

    p = sub.add_parser(
        "demo",
        help="run the built-in tiny model end to end (what `make demo` runs)",
        description="Builds the tiny random-weight model (cached), starts a local "
        "cluster, streams a few completions and prints TTFT, TPOT and KV bytes. "
        "The tiny model's weights are random: its text is gibberish by design.",
    )
    _add_engine_args(p)
    p.add_argument("--max-tokens", type=int, default=24)

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
        print(make_tiny_model(args.out_dir, args.arch, args.seed))
        return 0
    from pdserve.cluster import commands  # heavy imports (ray, torch) only when needed

    if args.command == "generate":
        return commands.generate(args)
    if args.command == "demo":
        return commands.demo(args, DEMO_PROMPTS)
    raise AssertionError(args.command)


def model_or_default(model: str | None) -> str:
    return model if model is not None else str(default_tiny_model())


if __name__ == "__main__":
    sys.exit(main())
