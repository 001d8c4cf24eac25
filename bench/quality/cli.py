"""`pdserve eval-ppl`: perplexity and greedy agreement of model settings, side by side.

    pdserve eval-ppl                                   # the default model, the default settings
    pdserve eval-ppl --setting bfloat16 --setting float32,quantization=int8,kv=int8

A setting is ``DTYPE[,quantization=none|int8|int4][,kv=auto|bfloat16|float16|fp8_e4m3|int8]``.
The first setting is the reference (float32 by default): the table gives each setting's
perplexity against it, the quality bound the issue set for its kind (int8 weights and a
compressed KV cache within 2%, 4-bit weights within 10%), and how many of the reference's greedy
answers to 20 chat prompts it reproduces.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pdserve.bench.model_settings import DEFAULT_SETTINGS, Setting, parse_setting

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to evaluate ({DEFAULT_MODEL})")
    p.add_argument(
        "--setting",
        action="append",
        type=parse_setting,
        dest="settings",
        metavar="SETTING",
        help="DTYPE[,quantization=Q][,kv=KV]; repeat for several; the first is the reference "
        f"(default: {' '.join(s.label for s in DEFAULT_SETTINGS)})",
    )
    p.add_argument("--window", type=int, default=1024, help="tokens of context per window")
    p.add_argument("--stride", type=int, default=512, help="tokens between windows")
    p.add_argument("--max-tokens", type=int, default=48, help="greedy answer length cap")
    p.add_argument("--no-agreement", action="store_true", help="perplexity only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a CPU worker runs 1)")
    p.add_argument(
        "--show-answers",
        type=int,
        default=0,
        metavar="N",
        help="print each setting's greedy answers to the first N chat prompts (they start with "
        "'What is the capital of France?')",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    from pdserve.bench.quality.agreement import CHAT_PROMPTS
    from pdserve.bench.quality.evaluate import evaluate, format_table  # torch from here on

    settings: list[Setting] = args.settings or list(DEFAULT_SETTINGS)
    rows = evaluate(args.model, settings, args)
    print(format_table(rows))
    for row in rows if args.show_answers > 0 else ():
        print(f"\n{row.setting.label}:")
        for question, answer in zip(CHAT_PROMPTS, row.answers[: args.show_answers]):
            print(f"  {question}  ->  {answer!r}")
    if args.out is not None:
        args.out.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
        print(f"results: {args.out}")
    return 0 if all(r.meets_bound is not False for r in rows) else 1
