"""Quantization benchmark: the speed and memory of each weight scheme and KV-cache dtype on one
model, against transformers in float32 and bfloat16, all in the same run.

    python -m pdserve.bench.micro.quant_bench --out quant.json

For every setting (``DTYPE[,quantization=Q][,kv=KV]``, as `pdserve eval-ppl` takes them; the
quality of the same settings is what eval-ppl measures) it reports the bytes the weights take,
the KV bytes one token takes in the cache (and on the wire), greedy decode tokens/s at each
batch size and prefill tokens/s, each as a ratio to transformers' `generate` / forward pass in
float32 and in bfloat16. All engines of one batch size run interleaved, round after round, so a
change of load on a shared machine hits them alike; each figure is the median of --repeats
runs. What is timed is defined in pdserve.bench.micro.engine_timers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from pdserve.bench.machine import machine_facts
from pdserve.bench.micro import engine_timers as timers
from pdserve.bench.micro.engine_bench import measure
from pdserve.bench.micro.engine_report import Series
from pdserve.bench.micro.engine_timers import Timed
from pdserve.bench.model_settings import Setting, parse_setting
from pdserve.bench.models import DTYPES, load_hf, load_pdserve, resolve_model, weight_bytes
from pdserve.engine.kv_cache import bytes_per_block
from pdserve.engine.model import CausalLM

DEFAULT_SETTINGS = "float32;bfloat16;float32,quantization=int8;float32,quantization=int4;" + (
    "bfloat16,quantization=int8;float32,kv=int8;float32,kv=fp8_e4m3"
)
BASELINES = tuple(f"transformers {d}" for d in DTYPES)


def run(args: argparse.Namespace) -> dict:
    """Every setting and both baselines at every batch size, decode then prefill."""
    torch.set_num_threads(args.threads)
    timers.quiet_transformers()
    path = resolve_model(args.model)
    models = {s.label: load_pdserve(path, s.dtype, s.quantization) for s in args.settings}
    hfs = {f"transformers {d}": load_hf(path, d) for d in DTYPES}
    kv = {s.label: s.kv for s in args.settings}
    runs = (len(args.batch_sizes) + len(args.prefill_batch_sizes)) * len(models | hfs)
    series: list[Series] = []
    with tqdm(total=runs * (args.warmup + args.repeats), desc="quant bench", unit="run") as bar:
        for b in args.batch_sizes:
            prompts = timers.make_prompts(b, args.prompt_len, models_vocab(models), args.seed)
            engines = {n: _decode(m, prompts, args, kv[n]) for n, m in models.items()}
            engines |= {n: _hf_decode(h, prompts, args) for n, h in hfs.items()}
            series += measure("decode", b, engines, args, bar).values()
        for b in args.prefill_batch_sizes:
            prompts = timers.make_prompts(b, args.prompt_len, models_vocab(models), args.seed)
            engines = {n: _prefill(m, prompts) for n, m in models.items()}
            engines |= {n: _hf_prefill(h, prompts) for n, h in hfs.items()}
            series += measure("prefill", b, engines, args, bar).values()
    memory = {s.label: _memory(models[s.label], s) for s in args.settings}
    memory |= {n: {"weight_bytes": weight_bytes(h)} for n, h in hfs.items()}
    return {
        "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "facts": {"model_path": str(path), **machine_facts(args.threads)},
        "memory": memory,
        "series": [asdict(s) | {"rates": s.rates, "median": s.median_rate} for s in series],
    }


def models_vocab(models: dict[str, CausalLM]) -> int:
    return next(iter(models.values())).config.vocab_size


def _decode(m: CausalLM, p: list[list[int]], a: argparse.Namespace, kv: str) -> Callable[[], Timed]:
    return lambda: timers.pdserve_decode(m, p, a.new_tokens, a.block_size, False, kv)


def _hf_decode(
    h: torch.nn.Module, p: list[list[int]], a: argparse.Namespace
) -> Callable[[], Timed]:
    return lambda: timers.hf_generate(h, p, a.new_tokens)  # type: ignore[arg-type]


def _prefill(m: CausalLM, p: list[list[int]]) -> Callable[[], Timed]:
    return lambda: timers.pdserve_prefill(m, p)


def _hf_prefill(h: torch.nn.Module, p: list[list[int]]) -> Callable[[], Timed]:
    return lambda: timers.hf_prefill(h, p)  # type: ignore[arg-type]


def _memory(model: CausalLM, setting: Setting) -> dict[str, float]:
    per_token = bytes_per_block(model.config, 1, 16, setting.kv) / 16
    return {"weight_bytes": weight_bytes(model), "kv_bytes_per_token": per_token}


def format_table(result: dict) -> str:
    """One line per engine: memory, then tokens/s and the ratios to both baselines per figure."""
    medians = {(s["engine"], s["phase"], s["batch"]): s["median"] for s in result["series"]}
    figures = sorted({(p, b) for _, p, b in medians}, key=lambda f: (f[0] != "decode", f[1]))
    head = ["engine", "weights MB", "KV B/tok"] + [f"{p} B={b}" for p, b in figures]
    lines = [head]
    for engine, mem in result["memory"].items():
        row = [
            engine,
            f"{mem['weight_bytes'] / 1e6:.1f}",
            f"{mem.get('kv_bytes_per_token', 0):,.0f}",
        ]
        for p, b in figures:
            rate = medians[(engine, p, b)]
            ratios = "/".join(f"{rate / medians[(base, p, b)]:.2f}" for base in BASELINES)
            row.append(f"{rate:,.0f} ({ratios}x)")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines]
    note = "tokens/s (ratio to transformers float32 / bfloat16, same run)"
    return "\n".join([text[0], "-" * len(text[0]), *text[1:], "", note])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.micro.quant_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default="smollm2", help="as the engine bench's --model (default smollm2)"
    )
    p.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help="';'-separated DTYPE[,quantization=none|int8|int4][,kv=KV] (default: float32, "
        "bfloat16, int8 and int4 weights, bfloat16 with int8 weights, int8 and fp8_e4m3 KV)",
    )
    p.add_argument("--batch-sizes", default="1,8,32", help="decode batch sizes (default 1,8,32)")
    p.add_argument("--prefill-batch-sizes", default="1,8", help="prefill batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt (default 256)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median; 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    p.add_argument("--block-size", type=int, default=16, help="pdserve KV block size")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--out", type=Path, help="write the raw numbers as JSON here")
    args = p.parse_args(argv)
    try:
        args.settings = [parse_setting(s) for s in args.settings.split(";") if s.strip()]
        args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
        args.prefill_batch_sizes = [int(x) for x in args.prefill_batch_sizes.split(",") if x]
    except (argparse.ArgumentTypeError, ValueError) as exc:
        p.error(str(exc))
    if args.repeats < 1 or args.new_tokens < 2 or min(args.batch_sizes, default=0) < 1:
        p.error("--repeats >= 1, --new-tokens >= 2 and positive --batch-sizes, e.g. 1,8,32")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(
        f"\nmodel {args.model}  prompt {args.prompt_len}, {args.new_tokens} new  median of "
        f"{args.repeats}  {result['facts']['cpu']}  threads {args.threads}\n"
    )
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
        print(f"\nraw numbers: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
