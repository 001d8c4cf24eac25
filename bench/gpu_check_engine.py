"""The engine benchmark on a GPU: pdserve's decode and prefill against transformers, same model,
prompts, dtype and device, ``make gpu-check``'s engine step.

``micro.engine_bench`` runs on the CPU only (its timers build CPU tensors and a CPU cache), so
this is its short CUDA form, on the same definitions (``micro.engine_timers``): decode tokens/s
from the moment every sequence has its first token, pdserve's ``DecodeEngine`` (the step a
decode replica runs) against transformers' ``generate`` on one static batch; prefill tokens/s
of one forward pass over the batch against transformers' plain forward. Engines interleave
round by round (``engine_bench.measure``) and the table is ``engine_report``'s. What the GPU
changes: each prefill is timed to a ``torch.cuda.synchronize``, so a figure is work done, not
work queued; a decode step hands its tokens to Python, which waits for them anyway (so does
``generate``, whose clock is read once per token, within one step of the work).

    python -m pdserve.bench.gpu_check_engine                       # cuda, smollm2, bfloat16
    python -m pdserve.bench.gpu_check_engine --device cpu --model tiny --batch-sizes 1,4
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from pdserve.bench.gpu_check_runner import write_result
from pdserve.bench.micro import engine_timers as timers
from pdserve.bench.micro.engine_bench import batch_sizes, measure
from pdserve.bench.micro.engine_report import Row, format_table, to_json
from pdserve.bench.micro.engine_timers import Timed
from pdserve.bench.models import DTYPES, load_hf, num_params, resolve_model
from pdserve.engine.config import ModelConfig
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup


def pdserve_decode(
    model: CausalLM, prompts: list[list[int]], new_tokens: int, block_size: int, device: str
) -> Timed:
    """``engine_timers.pdserve_decode`` (greedy) with the engine's cache on ``device``."""
    return timers.pdserve_decode(
        model, prompts, new_tokens, block_size, False, device=torch.device(device)
    )


def on_device(device: str, call: Callable[[], Timed], own_clock: bool = False) -> Timed:
    """``call`` (an engine_timers function) with its new tensors made on ``device``, timed here
    to the end of the work it queued; ``own_clock``: by its own clock instead (generate's,
    which starts at the first token: its prefill is not decode time)."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with dev:
        sync()
        start = time.perf_counter()
        timed = call()
        sync()
    seconds = timed.seconds if own_clock else time.perf_counter() - start
    return Timed(seconds, timed.tokens, timed.outputs)


def run_benchmark(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    path, dev = resolve_model(args.model), args.device
    config = ModelConfig.from_pretrained(str(path), dtype=args.dtype, device=dev.split(":")[0])
    model = load_model(config, TPGroup.single(), dev)
    hf: PreTrainedModel = load_hf(path, args.dtype).to(dev)
    timers.quiet_transformers()
    rows: list[Row] = []
    total = len(args.batch_sizes) * (args.warmup + args.repeats) * 4
    with tqdm(total=total, desc="engine", unit="run", mininterval=5) as bar:
        for b in args.batch_sizes:
            prompts = timers.make_prompts(b, args.prompt_len, config.vocab_size, args.seed)
            rows += _rows(model, hf, prompts, args, bar)
    facts = {"model_path": str(path), "params": num_params(model), "device": dev}
    if dev.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(dev))
    return rows, facts


def _rows(
    model: CausalLM,
    hf: PreTrainedModel,
    prompts: list[list[int]],
    args: argparse.Namespace,
    bar: tqdm,
) -> list[Row]:
    """Decode and prefill at one batch size: pdserve against transformers."""
    b, n, bs, dev = len(prompts), args.new_tokens, args.block_size, args.device
    decode = {
        "pdserve": lambda: pdserve_decode(model, prompts, n, bs, dev),
        "generate": lambda: on_device(dev, lambda: timers.hf_generate(hf, prompts, n), True),
    }
    s = measure("decode", b, decode, args, bar)
    rows = [Row("decode", b, s["pdserve"], s["generate"])]
    prefill = {
        "pdserve": lambda: on_device(dev, lambda: timers.pdserve_prefill(model, prompts)),
        "forward": lambda: on_device(dev, lambda: timers.hf_prefill(hf, prompts)),
    }
    s = measure("prefill", b, prefill, args, bar)
    return [*rows, Row("prefill", b, s["pdserve"], s["forward"])]


def markdown(rows: Sequence[Row], args: argparse.Namespace) -> str:
    lines = [
        f"{args.model} in {args.dtype} on {args.device}: prompts of {args.prompt_len} tokens, "
        f"{args.new_tokens} new, median of {args.repeats} (+{args.warmup} warm-up).",
        "",
        "| phase | batch | pdserve tok/s | baseline | tok/s | ratio | same outputs |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.phase} | {r.batch} | {r.ours.median_rate:,.0f} | {r.baseline} | "
            f"{r.base.median_rate:,.0f} | {r.ratio:.2f}x | {r.base.same_outputs or ''} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.gpu_check_engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="bench.models name (default smollm2)")
    p.add_argument("--device", default="cuda", help="torch device of both sides (default cuda)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="default bfloat16")
    p.add_argument("--batch-sizes", type=batch_sizes, default=[1, 32], help="default 1,32")
    p.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt (256)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per sequence (64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (1)")
    p.add_argument("--block-size", type=int, default=16, help="pdserve KV block size")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--result", help="write the figures here as JSON (gpu_check's step result)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows, facts = run_benchmark(args)
    print(format_table(rows))
    summary = ", ".join(f"{r.phase} B={r.batch} {r.ratio:.2f}x" for r in rows)
    summary = f"pdserve over transformers ({args.dtype}): {summary}"
    print(summary)
    if args.result:
        data = to_json(rows, facts, args) | {"summary": summary, "markdown": markdown(rows, args)}
        write_result(args.result, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
