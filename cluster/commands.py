"""Implementations of the heavier CLI commands (imported lazily by ``cli``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from pdserve.cluster.cli import model_or_default
from pdserve.cluster.llm import LLM
from pdserve.engine.request import RequestMetrics
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams


def _start(args: argparse.Namespace, console: Console) -> LLM:
    model = model_or_default(args.model)
    with console.status(
        f"starting a local cluster: prefill TP={args.prefill_tp}, "
        f"{args.decode_instances} decode replica(s), model {model}"
    ):
        start = time.perf_counter()
        llm = LLM(
            model,
            prefill_tensor_parallel_size=args.prefill_tp,
            decode_instances=args.decode_instances,
            dtype=args.dtype,
            device=args.device,
            ray_address=args.ray_address,
        )
    console.print(
        f"[green]cluster ready[/] in {time.perf_counter() - start:.1f} s "
        f"(device {llm.spec.engine.device})",
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
    llm: LLM, prompts: Sequence[str], params: SamplingParams, console: Console
) -> list[tuple[str, str | None, RequestMetrics]]:
    rows = []
    for prompt in prompts:
        console.print(f"[bold]{prompt}[/]", end="", highlight=False)
        last = None
        for delta in llm.stream(prompt, params):
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
                rows = _stream_prompts(llm, args.prompts, params, console)
            else:
                outs = llm.generate(args.prompts, params)
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
        "[bold]pdserve demo[/]: a prefill actor computes each prompt's KV cache and "
        "ships it over torch.distributed to a decode actor, which streams the tokens.\n"
        "The built-in tiny model has random weights, so its text is gibberish by design.\n"
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    with _start(args, console) as llm:
        rows = _stream_prompts(llm, prompts, params, console)
        console.print(_metrics_table(rows))
        llm.check_integrity()
        console.print("[green]all KV blocks returned to the decode pool[/]")
    return 0
