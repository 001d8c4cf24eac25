"""Speculative decoding in the engine: decode tokens/s and TPOT with and without it, same model,
same prompts, same process, interleaved runs.

    python -m pdserve.bench.micro.spec_bench --model smollm2 --dtype bfloat16 --out spec.json

Two workloads of chat prompts (the model's chat template): ``repeat`` asks to copy or edit a
given passage, code or list, where the answer repeats the prompt and prompt lookup finds it;
``chat`` asks free-form questions, where little repeats. For each workload, batch size,
temperature and proposer, the same prompts are decoded by a `DecodeEngine` without speculation
and with it, alternating (off, on, off, on, ...) so a change of load on a shared machine hits
both; each figure is the median over --repeats runs after --warmup untimed ones. Timed: the
engine's steps after the prompts' prefill (the step a decode replica runs), until every
sequence has --new-tokens tokens. TPOT: the timed seconds over the tokens each sequence got.
Sampled runs use per-request seeds, so both sides draw the same tokens (engine/speculative.py).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from pdserve.bench.machine import machine_facts
from pdserve.bench.micro.engine_bench import batch_sizes
from pdserve.bench.micro.spec_report import Figure, format_table, targets
from pdserve.bench.models import DTYPES, load_pdserve, resolve_model
from pdserve.decode_worker.draft_proposer import DraftModelProposer, build_draft_proposer
from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.runner import build_engine, model_limits
from pdserve.engine.model import CausalLM
from pdserve.engine.request import DecodeRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.speculative import SpecCounters, SpeculativeSettings
from pdserve.engine.tokenizer import apply_chat_template, load_tokenizer

CPU = torch.device("cpu")

PASSAGE = (
    "The old lighthouse stood at the edge of the cliff for more than a century. Every night "
    "its keeper climbed the hundred and twelve steps, wound the clockwork, trimmed the wick and "
    "watched the beam sweep across the water. Ships passing in the dark knew the rhythm of its "
    "light: three short flashes and one long, repeated every twenty seconds."
)
CODE = (
    "def total_price(items, tax_rate):\n"
    "    n = 0\n"
    "    for item in items:\n"
    "        n += item.price * item.quantity\n"
    "    return n * (1 + tax_rate)\n"
)
LIST = "- eggs\n- flour\n- butter\n- sugar\n- apples\n- cinnamon\n- lemons\n- vanilla"
WORKLOADS = {
    "repeat": (
        f"Repeat the following paragraph exactly, word for word:\n\n{PASSAGE}",
        f"Rename the variable n to total in this Python function and change nothing else:\n\n"
        f"{CODE}",
        f"Copy this shopping list exactly, then add milk at the end:\n\n{LIST}",
        "Fix the spelling mistakes in this text and return the whole text:\n\n"
        + PASSAGE.replace("century", "centruy").replace("keeper", "keepr"),
    ),
    "chat": (
        "Tell me a short story about a dragon who learns to cook.",
        "What are three tips for staying focused while studying?",
        "Explain how a rainbow forms.",
        "Describe a perfect weekend in the mountains.",
    ),
}


def token_groups(model_path: Path, workload: str, batch: int) -> list[list[list[int]]]:
    """The batches one run decodes, as token ids: every prompt of the workload at least once
    (batch 1: its four prompts one after another; batch 16: each four times at once)."""
    tok = load_tokenizer(str(model_path))
    texts = WORKLOADS[workload]
    n = max(batch, len(texts))
    chats = [[{"role": "user", "content": texts[i % len(texts)]}] for i in range(n)]
    prompts = [list(apply_chat_template(tok, c)) for c in chats]
    return [prompts[i : i + batch] for i in range(0, n, batch)]


def decode_run(
    model: CausalLM,
    prompts: list[list[int]],
    params: list[SamplingParams],
    spec: SpeculativeSettings | None,
    draft: CausalLM | None = None,
) -> tuple[float, int, list[list[int]], DecodeEngine]:
    """Prefill (untimed), then time the engine's steps until every sequence is done. With
    ``draft``, a draft-model proposer on it (its cache fresh, as the target's)."""
    new = max(p.max_tokens for p in params)
    max_len = max(map(len, prompts)) + new + 1
    num_blocks = len(prompts) * math.ceil((max_len + 16) / 16)
    limits = model_limits(
        model, num_blocks, 16, max_len, max_num_seqs=len(prompts),
        max_num_batched_tokens=sum(map(len, prompts)), speculative=spec,
    )  # fmt: skip
    proposer = None if draft is None else DraftModelProposer(draft, num_blocks, 16, CPU)
    engine = build_engine(model, limits, CPU, proposer=proposer)
    outputs: dict[int, list[int]] = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        assert engine.reserve(DecodeRequest(i, f"spec-{i}", tuple(p), sp, local_prefill=True))
        outputs[i] = []
    while len(engine.prefills):
        for tid, delta in engine.step():
            outputs[tid] += delta.token_ids
    counted = 0
    start = time.perf_counter()
    while engine.has_work:
        for tid, delta in engine.step():
            assert delta.error is None, delta.error
            outputs[tid] += delta.token_ids
            counted += len(delta.token_ids)
    seconds = time.perf_counter() - start
    assert engine.check_integrity() == 0
    return seconds, counted, [outputs[i] for i in range(len(prompts))], engine


def measure(
    model: CausalLM, model_path: Path, fig: Figure, spec: SpeculativeSettings,
    draft: CausalLM | None, args: argparse.Namespace, bar: tqdm,
) -> None:  # fmt: skip
    groups = token_groups(model_path, fig.workload, fig.batch)
    params = [
        SamplingParams(max_tokens=args.new_tokens, temperature=fig.temperature, seed=i,
                       ignore_eos=True)
        for i in range(fig.batch)
    ]  # fmt: skip
    for round_ in range(args.warmup + args.repeats):
        off_s = on_s = 0.0
        counters = SpecCounters()
        for prompts in groups:
            off = decode_run(model, prompts, params[: len(prompts)], None)
            on = decode_run(model, prompts, params[: len(prompts)], spec, draft)
            assert off[1] == on[1], (off[1], on[1])
            off_s, on_s = off_s + off[0], on_s + on[0]
            if round_ >= args.warmup:
                fig.same_outputs &= off[2] == on[2]
                fig.tokens += on[1] if round_ == args.warmup else 0
                counters.merge(on[3].spec_counters)
        bar.update()
        if round_ < args.warmup:
            continue
        fig.off_s.append(off_s)
        fig.on_s.append(on_s)
        fig.spec = counters


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.micro.spec_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="as engine_bench's --model (a chat model)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="default bfloat16")
    p.add_argument("--batch-sizes", type=batch_sizes, default=[1, 4, 16], help="default 1,4,16")
    p.add_argument("--temperatures", type=_floats, default=[0.0, 0.7], help="default 0,0.7")
    p.add_argument("--workloads", default="repeat,chat", help="repeat, chat or both (default)")
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4, help="default 4")
    p.add_argument(
        "--method", choices=("ngram", "draft"), default="ngram",
        help="the proposer (default ngram: prompt lookup)",
    )  # fmt: skip
    p.add_argument(
        "--draft-model", default=None,
        help="method draft: the draft model (default: the target's own checkpoint)",
    )  # fmt: skip
    p.add_argument(
        "--draft-layers", type=int, default=None,
        help="method draft: keep the draft's first N layers (default: all)",
    )  # fmt: skip
    p.add_argument("--prompt-lookup-max", type=int, default=4, help="n-gram sizes (default 4..2)")
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument(
        "--min-acceptance-rate", type=float, default=SpeculativeSettings.min_acceptance_rate,
        help="per-sequence switch-off below this acceptance (default: the engine's; 0: never)",
    )  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=96, help="tokens per sequence (default 96)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, a worker's)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not set(args.workloads) <= set(WORKLOADS) or not args.workloads:
        p.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.new_tokens < 2:
        p.error("--repeats, --threads >= 1, --warmup >= 0, --new-tokens >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = load_pdserve(path, args.dtype)
    draft = None
    if args.method == "draft":
        draft_path = str(resolve_model(args.draft_model) if args.draft_model else path)
        cache = torch.device("cpu")
        draft = build_draft_proposer(draft_path, args.draft_layers, model, 1, 16, cache).model
    spec = SpeculativeSettings(
        args.method, args.num_speculative_tokens, args.prompt_lookup_max,
        args.prompt_lookup_min, draft_model=None if draft is None else "draft",
        draft_num_layers=args.draft_layers, min_acceptance_rate=args.min_acceptance_rate,
    )  # fmt: skip
    figures = [
        Figure(w, b, t, spec.method)
        for w in args.workloads
        for t in args.temperatures
        for b in args.batch_sizes
    ]
    with tqdm(total=len(figures) * (args.warmup + args.repeats), unit="round") as bar:
        for fig in figures:
            bar.set_postfix_str(f"{fig.workload} B={fig.batch} temp={fig.temperature}")
            measure(model, path, fig, spec, draft, args, bar)
    facts = machine_facts(args.threads)
    print(
        f"\nmodel {args.model} ({args.dtype}), {spec.method}"
        f"{f' (first {args.draft_layers} layers)' if args.draft_layers else ''}, "
        f"k={spec.num_speculative_tokens}, "
        f"{args.new_tokens} new tokens, median of {args.repeats} (+{args.warmup} warm-up), "
        f"{facts['cpu']} x{facts['cpu_count']}, threads {args.threads}\n"
    )
    print(format_table(figures))
    print("\n".join(["", *targets(figures)]))
    if args.out is not None:
        record = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": facts,
            "figures": [asdict(f) | {"speedup": f.speedup} for f in figures],
        }
        args.out.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
