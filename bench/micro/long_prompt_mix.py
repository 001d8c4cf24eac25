"""Long-prompt mix: one very long prompt among a stream of short ones, with the prefill pool's
chunked prefill off and then on, on the same model, in the same process (two deployments, one
after the other). What it shows: without chunking a short prompt that arrives while the long
one is prefilled waits for the whole of it; with chunking the long prompt's chunks interleave
with short prompts, so their TTFT stays near one step.

    python -m pdserve.bench.micro.long_prompt_mix --long 8000 --shorts 24 --out mix.json

Each deployment is 1 prefill instance + 1 decode replica (real Ray actors, KV over gloo), prefix
caching off (random token ids: nothing would hit anyway). The long prompt is sent at t = 0,
short prompt i at t = --first-short + i x --interval. Reported per run: the short prompts' TTFT
(p50, p99, max), the long prompt's TTFT and the prefill process's peak resident memory
(weights and its KV cache included: the difference between the runs is the forward pass's
working memory); the ratio is unchunked over chunked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pdserve.cluster.llm import LLM
from pdserve.engine.sampling_params import SamplingParams


def run_mix(args: argparse.Namespace, chunked: bool) -> dict[str, Any]:
    """One deployment, one mix; TTFTs in seconds."""
    params = SamplingParams(max_tokens=args.out_tokens, temperature=0.0, ignore_eos=True)
    keywords: dict[str, Any] = {
        "dtype": args.dtype,
        "enable_prefix_caching": False,
        "prefill_chunked_prefill": chunked,
        "max_batch_tokens": args.chunk if chunked else max(args.long, 8192),
        "kv_cache_memory": args.kv_cache_memory,
        "prefill_kv_cache_memory": args.kv_cache_memory,
    }
    with LLM(args.model, **keywords) as llm:
        vocab = llm.model_config.vocab_size  # ids past the specials, inside the vocabulary
        rng = np.random.default_rng(args.seed)
        long_ids = rng.integers(vocab // 8, vocab, args.long).tolist()
        shorts = [rng.integers(vocab // 8, vocab, args.short).tolist() for _ in range(args.shorts)]
        llm.generate([shorts[0]], params)  # warm-up: links, first-call costs

        async def mix() -> tuple[float, list[float]]:
            t0 = time.perf_counter()

            async def one(ids: list[int], at: float) -> float:
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
                out = await llm.frontend.generate(ids, params)
                return out.metrics.ttft

            times = [args.first_short + i * args.interval for i in range(len(shorts))]
            long_task = asyncio.ensure_future(one(long_ids, 0.0))
            short_ttfts = await asyncio.gather(*(one(s, t) for s, t in zip(shorts, times)))
            return await long_task, list(short_ttfts)

        long_ttft, short_ttfts = llm._loop.run(mix())
        assert llm.check_integrity() == 0
        peak_mb = _peak_rss_mb(llm.deployment.prefill[0].leader)
    return {
        "prefill_peak_rss_mb": peak_mb,
        "chunked": chunked,
        "long_ttft_s": long_ttft,
        "short_ttft_s": short_ttfts,
        "short_p50_s": float(np.percentile(short_ttfts, 50)),
        "short_p99_s": float(np.percentile(short_ttfts, 99)),
        "short_max_s": max(short_ttfts),
    }


def _peak_rss_mb(actor: Any) -> float:
    """The prefill process's peak resident memory (MB), weights and its KV cache included."""
    import ray

    peak_kb = ray.get(actor.__ray_call__.remote(lambda _: _max_rss_kb()), timeout=60)
    return peak_kb / 1024


def _max_rss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def format_report(runs: Sequence[dict[str, Any]]) -> str:
    lines = ["prefill      short TTFT p50   p99       max       long TTFT  prefill peak RSS"]
    for r in runs:
        name = "chunked" if r["chunked"] else "whole"
        lines.append(
            f"{name:<12} {r['short_p50_s']:>8.2f} s  {r['short_p99_s']:>7.2f} s  "
            f"{r['short_max_s']:>7.2f} s  {r['long_ttft_s']:>7.2f} s  "
            f"{r['prefill_peak_rss_mb']:>8,.0f} MB"
        )
    if len(runs) == 2:
        whole, chunked = (r for r in sorted(runs, key=lambda r: r["chunked"]))
        lines.append(
            f"short TTFT p99 without chunking / with: "
            f"{whole['short_p99_s'] / chunked['short_p99_s']:.2f}x"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.micro.long_prompt_mix",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default="builtin:smollm2-135m-instruct", help="model (default SmolLM2)"
    )
    p.add_argument("--dtype", default="float32", help="serving dtype (default float32)")
    p.add_argument("--long", type=int, default=8000, help="tokens of the long prompt (8000)")
    p.add_argument("--short", type=int, default=64, help="tokens of each short prompt (64)")
    p.add_argument("--shorts", type=int, default=24, help="short prompts (24)")
    p.add_argument("--first-short", type=float, default=1.0, help="s before the first short (1)")
    p.add_argument("--interval", type=float, default=0.5, help="s between short prompts (0.5)")
    p.add_argument("--out-tokens", type=int, default=8, help="tokens generated per request (8)")
    p.add_argument("--chunk", type=int, default=512, help="prefill step budget when chunked")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV cache of each pool (1GiB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--only", choices=("whole", "chunked"), help="run one of the two")
    p.add_argument("--out", type=Path, help="write the raw numbers as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [
        m for m in (False, True) if args.only is None or args.only == ("chunked" if m else "whole")
    ]
    runs = [run_mix(args, m) for m in tqdm(modes, desc="deployments", unit="run")]
    print(format_report(runs))
    if args.out is not None:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": None}, "runs": runs}, indent=2, default=str)
        )
        print(f"raw numbers: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
