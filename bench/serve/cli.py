"""`pdserve bench`: load an OpenAI-compatible server with a workload and report goodput.

Flags and the printed block follow `vllm bench serve`. The run itself is `run_benchmark` in
`pdserve.bench.serve.runner` (re-exported here), which sweeps call in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.serve.metrics import (
    LATENCY_METRICS,
    GoodputSpecError,
    format_result,
    parse_goodput,
)
from pdserve.bench.serve.runner import (
    CHAT,
    COMPLETIONS,
    BenchConfig,
    BenchError,
    BenchResult,
    run_benchmark,
)
from pdserve.bench.serve.server_cache import format_reuse
from pdserve.bench.serve.workloads import (
    WORKLOAD_HELP,
    TraceWorkload,
    WorkloadError,
    parse_workload,
)

__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "add_bench_args",
    "run_bench",
    "run_benchmark",
]


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """The `pdserve bench` flags (named as `vllm bench serve`'s where both have them)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = WORKLOAD_HELP
    parser.add_argument(
        "--url",
        "--base-url",
        dest="base_url",
        default=BenchConfig.base_url,
        help="server root (default %(default)s)",
    )
    parser.add_argument(
        "--endpoint",
        default=BenchConfig.endpoint,
        choices=(COMPLETIONS, CHAT),
        help=f"{COMPLETIONS} (prompt: token ids, or text for chat, shared-prefix and multi-turn: "
        f"a transcript of system prompt and turns) or {CHAT} (messages: system prompt, earlier "
        "turns with the model's answers, the user message); default %(default)s",
    )
    parser.add_argument("--model", default=None, help="model name (default: ask /v1/models)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="sizes text prompts: a model directory, GGUF file or builtin:NAME (default: the "
        "served model's, if found; else lengths are estimated from words)",
    )
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--workload",
        default=BenchConfig.workload,
        help="what to send, see below (default %(default)s)",
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests/s; inf sends all at t=0 (default inf). multi-turn: conversations open at "
        "rate x conversations / requests, each later turn goes when the answer before it is back",
    )
    parser.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of arrival gaps: 1 Poisson, <1 burstier, >1 smoother",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=BenchConfig.num_prompts, help="requests to send"
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="most requests in flight at once (default: no limit)",
    )
    parser.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="NAME:MS",
        help="SLOs for goodput and attainment, e.g. ttft:500 tpot:50 [e2el:MS]",
    )
    parser.add_argument(
        "--percentile-metrics",
        default=",".join(LATENCY_METRICS),
        help="metrics to report percentiles of (default %(default)s)",
    )
    parser.add_argument(
        "--metric-percentiles",
        default="99",
        help="comma-separated percentiles, e.g. 50,90,99 (default 99)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context to clip lengths to (default: from /v1/models)",
    )
    parser.add_argument("--num-warmups", type=int, default=0, help="unmeasured requests first")
    parser.add_argument(
        "--max-duration",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds; unfinished requests count as failed",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=600.0, metavar="S", help="per request"
    )
    parser.add_argument("--seed", type=int, default=0, help="lengths, arrivals and prompts")
    _add_sampling_args(parser)
    parser.add_argument(
        "--save-result", type=Path, default=None, metavar="FILE", help="write the summary as JSON"
    )
    parser.add_argument(
        "--save-records",
        type=Path,
        default=None,
        metavar="FILE",
        help="per-request JSONL (default: next to --save-result)",
    )
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's sampling flags: sent only when given, except temperature (0 by default)."""
    group = parser.add_argument_group("sampling (every request; outputs stay exactly as long)")
    group.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="default 0, greedy, as vLLM's bench sends (the server's own default is 1)",
    )
    group.add_argument("--top-p", type=float, default=None, help="default: not sent")
    group.add_argument("--top-k", type=int, default=None, help="default: not sent")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    try:
        percentiles = tuple(float(p) for p in args.metric_percentiles.split(","))
    except ValueError:
        raise BenchError(
            f"--metric-percentiles {args.metric_percentiles!r}: write numbers, e.g. 50,90,99"
        ) from None
    return BenchConfig(
        base_url=args.base_url,
        workload=parse_workload(args.workload),
        model=args.model,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        num_prompts=args.num_prompts,
        max_concurrency=args.max_concurrency,
        goodput_ms=parse_goodput(args.goodput),
        seed=args.seed,
        api_key=args.api_key,
        max_model_len=args.max_model_len,
        endpoint=args.endpoint,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        tokenizer=args.tokenizer,
        percentiles=percentiles,
        percentile_metrics=tuple(m.strip() for m in args.percentile_metrics.split(",")),
        num_warmups=args.num_warmups,
        request_timeout_s=args.request_timeout,
        max_duration_s=args.max_duration,
        show_progress=not args.disable_tqdm,
    )


def run_bench(args: argparse.Namespace) -> int:
    """`pdserve bench`: run, print the result block, save. 0 on success, 2 on bad input."""
    try:
        config = config_from_args(args)
        _print_traffic(config)
        result = asyncio.run(run_benchmark(config))
    except (BenchError, WorkloadError, GoodputSpecError, ValueError) as exc:
        print(f"pdserve bench: error: {exc}", file=sys.stderr)
        return 2
    print(
        format_result(
            result.summary, config.request_rate, config.max_concurrency, config.percentile_metrics
        )
    )
    reuse = format_reuse(result.result)
    if reuse:
        print(reuse)
    first_error = next((r.error for r in result.records if not r.success), None)
    if first_error:
        print(f"first failed request: {first_error}", file=sys.stderr)
    records_path = args.save_records
    if records_path is None and args.save_result is not None:
        records_path = args.save_result.with_suffix(".records.jsonl")
    result.save(args.save_result, records_path)
    return 0


def _print_traffic(config: BenchConfig) -> None:
    workload = config.workload
    assert not isinstance(workload, str), "config_from_args parses the workload"
    print(f"Workload: {workload.spec}")
    if isinstance(workload, TraceWorkload) and workload.replays_timestamps:
        print(f"Traffic: the trace's own timestamps, {workload.speedup:g}x speed")
    else:
        process = "Poisson process" if config.burstiness == 1.0 else "Gamma distribution"
        print(f"Traffic request rate: {config.request_rate}")
        print(f"Burstiness factor: {config.burstiness} ({process})")
    print(f"Maximum request concurrency: {config.max_concurrency}")
    sampling = ", ".join(f"{k}={v:g}" for k, v in config.sampling.items())
    print(f"Endpoint: {config.endpoint}; sampling: {sampling}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench", description=__doc__)
    add_bench_args(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
