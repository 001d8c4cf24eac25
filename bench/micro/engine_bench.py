"""Engine benchmark: pdserve's decode and prefill against transformers, same model, same prompts,
same process, same thread count, same dtype. Prints a table and optionally writes the raw
numbers as JSON.

    python -m pdserve.bench.micro.engine_bench --model smollm2 --dtype bfloat16 --out engine.json

Sampled decode (temperature 1.0, top-p 0.9, what users send) is compared with pdserve's own
greedy decode at the same batch size, in the same interleaved rounds: the cost of sampling.

What is timed, and how, is defined in pdserve.bench.micro.engine_timers. Runs of the engines being
compared are interleaved (A, B, C, A, B, C, ...) so a change of load on a shared machine hits
them alike; each figure is the median over --repeats runs after --warmup untimed ones.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from pdserve.bench.machine import machine_facts
from pdserve.bench.micro import engine_timers as timers
from pdserve.bench.micro.engine_report import Row, Series, format_table, to_json
from pdserve.bench.micro.engine_timers import Timed
from pdserve.bench.models import DTYPES, load_hf, load_pdserve, num_params, resolve_model
from pdserve.engine.model import CausalLM

DECODE_TARGET = (32, 1.5)  # (batch, ratio): decode at batch 32 >= 1.5x static-batch generate
PREFILL_TARGET = 0.95  # prefill >= 0.95x a plain transformers forward, at every batch size
SAMPLED_TARGET = ((1, 32), 0.95)  # (batches, ratio): sampled decode >= 0.95x greedy decode


def measure(
    phase: str,
    batch: int,
    engines: dict[str, Callable[[], Timed]],
    args: argparse.Namespace,
    bar: tqdm,
) -> dict[str, Series]:
    """Warm every engine up, then time them round robin, `args.repeats` rounds."""
    bar.set_postfix_str(f"{phase} B={batch}")
    for _ in range(args.warmup):
        for run in engines.values():
            run()
            bar.update()
    series = {name: Series(phase, batch, name) for name in engines}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, run in engines.items():
            timed = run()
            series[name].seconds.append(timed.seconds)
            series[name].tokens.append(timed.tokens)
            outputs.setdefault(name, timed.outputs)
            bar.update()
    ours = outputs.get("pdserve", [])
    for name, s in series.items():
        # sampled engines draw from different generators: their tokens are not comparable
        if name != "pdserve" and "sampled" not in name and ours and outputs[name]:
            same = sum(a == b for a, b in zip(ours, outputs[name], strict=True))
            s.same_outputs = f"{same}/{len(ours)}"
    return series


def run_benchmark(args: argparse.Namespace) -> tuple[list[Row], dict]:
    """Every phase at every batch size; returns the comparison rows and run facts."""
    torch.set_num_threads(args.threads)
    timers.quiet_transformers()
    path = resolve_model(args.model)
    model, hf = load_pdserve(path, args.dtype), load_hf(path, args.dtype)
    vocab = model.config.vocab_size
    per_batch = args.warmup + args.repeats
    engines_per_batch = 2 + args.generate_batch + 2 * args.sampled + 2 + args.kv_send
    kv = (
        timers.KVSendBench(model, max(args.batch_sizes), args.prompt_len, args.block_size)
        if args.kv_send
        else None
    )
    rows: list[Row] = []
    total = len(args.batch_sizes) * per_batch * engines_per_batch
    try:
        with tqdm(total=total, desc="engine bench", unit="run") as bar:
            for b in args.batch_sizes:
                prompts = timers.make_prompts(b, args.prompt_len, vocab, args.seed)
                rows += _decode_rows(b, prompts, model, hf, args, bar)
                rows += _prefill_rows(b, prompts, model, hf, kv, args, bar)
    finally:
        if kv is not None:
            kv.close()
    facts = {"model_path": str(path), "params": num_params(model), **machine_facts(args.threads)}
    return rows, facts


def _decode_rows(
    b: int,
    prompts: list[list[int]],
    model: CausalLM,
    hf: PreTrainedModel,
    args: argparse.Namespace,
    bar: tqdm,
) -> list[Row]:
    n, bs = args.new_tokens, args.block_size
    engines = {"pdserve": lambda: timers.pdserve_decode(model, prompts, n, bs, sample=False)}
    if args.sampled:  # right after greedy: the two meet the same load on a shared machine
        engines["pdserve sampled"] = lambda: timers.pdserve_decode(
            model, prompts, n, bs, sample=True
        )
    engines["generate"] = lambda: timers.hf_generate(hf, prompts, n)
    if args.generate_batch:
        engines["generate_batch"] = lambda: timers.hf_generate_batch(hf, prompts, n)
    if args.sampled:
        engines["generate sampled"] = lambda: timers.hf_generate(hf, prompts, n, sample=True)
    s = measure("decode", b, engines, args, bar)
    target = DECODE_TARGET[1] if b == DECODE_TARGET[0] else None
    rows = [Row("decode", b, s["pdserve"], s["generate"], target)]
    if "generate_batch" in s:
        rows.append(Row("decode", b, s["pdserve"], s["generate_batch"]))
    if args.sampled:
        ours = s["pdserve sampled"]
        target = SAMPLED_TARGET[1] if b in SAMPLED_TARGET[0] else None
        rows.append(Row("decode sampled", b, ours, s["pdserve"], target, "pdserve greedy"))
        rows.append(Row("decode sampled", b, ours, s["generate sampled"]))
    return rows


def _prefill_rows(
    b: int,
    prompts: list[list[int]],
    model: CausalLM,
    hf: PreTrainedModel,
    kv: timers.KVSendBench | None,
    args: argparse.Namespace,
    bar: tqdm,
) -> list[Row]:
    engines = {
        "pdserve": lambda: timers.pdserve_prefill(model, prompts),
        "forward": lambda: timers.hf_prefill(hf, prompts),
    }
    if kv is not None:
        engines["pdserve+send"] = lambda: kv.run(prompts)
    s = measure("prefill", b, engines, args, bar)
    rows = [Row("prefill", b, s["pdserve"], s["forward"], PREFILL_TARGET)]
    if "pdserve+send" in s:
        rows.append(Row("prefill + KV send", b, s["pdserve+send"], s["forward"]))
    return rows


def batch_sizes(text: str) -> list[int]:
    """An argparse type: comma-separated positive batch sizes."""
    sizes = [int(x) for x in text.split(",") if x.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive batch sizes, e.g. 1,8,32")
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.micro.engine_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=timers.__doc__,
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (default: the real SmolLM2-135M-Instruct, builtin:smollm2-135m-instruct), "
        "any builtin:<name>, tiny (built-in test model), small (random 58M Llama, built into "
        "the pdserve cache dir on first use), a local Hugging Face checkpoint dir or a .gguf "
        "file (converted once; both sides load the converted weights)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of both pdserve and transformers (default float32)",
    )
    p.add_argument(
        "--batch-sizes",
        type=batch_sizes,
        default=[1, 8, 32],
        help="comma-separated batch sizes (default 1,8,32)",
    )
    p.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt (default 256)")
    p.add_argument(
        "--new-tokens",
        type=int,
        default=64,
        help="tokens generated per sequence, the prefill's first included (default 64)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides (default 1, as a pdserve CPU worker)",
    )
    p.add_argument("--block-size", type=int, default=16, help="pdserve KV block size")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument(
        "--no-generate-batch",
        dest="generate_batch",
        action="store_false",
        help="skip transformers' continuous batching (generate_batch)",
    )
    p.add_argument(
        "--no-kv-send", dest="kv_send", action="store_false", help="skip the prefill + KV send rows"
    )
    p.add_argument(
        "--no-sampled",
        dest="sampled",
        action="store_false",
        help="skip sampled decode (temperature 1, top-p 0.9; pdserve and generate)",
    )
    p.add_argument("--out", type=Path, help="write the raw numbers as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.prompt_len < 1 or args.new_tokens < 2:
        p.error("--prompt-len must be >= 1 and --new-tokens >= 2 (one prefill token + decode)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows, facts = run_benchmark(args)
    print(
        f"\nmodel {args.model} ({facts['params'] / 1e6:.1f}M params, {args.dtype})  "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new  "
        f"median of {args.repeats} (+{args.warmup} warm-up)"
    )
    print(
        f"{facts['cpu']} x{facts['cpu_count']}  torch {facts['torch']}  transformers "
        f"{facts['transformers']}  threads {facts['threads']}\n"
    )
    print(format_table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(to_json(rows, facts, args), indent=2, default=str))
        print(f"\nraw numbers: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
