"""TPOT through a deployment at 1, 2 and 4 concurrent streams (offline `LLM`, 1 prefill + 1
decode): how much a decode step costs once Ray, the router and streaming are in the loop.

    python -m pdserve.bench.micro.stream_tpot [--model small] [--new-tokens 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

from pdserve.bench.models import servable_model
from pdserve.cluster import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="small", help="bench model: tiny or small")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="rounds per concurrency; median")
    p.add_argument("--concurrency", default="1,2,4", help="comma-separated stream counts")
    args = p.parse_args()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = [[17 + (i * 7 + j) % 400 for j in range(args.prompt_len)] for i in range(max(levels))]
    with LLM(str(servable_model(args.model)), max_model_len=1024) as llm:
        llm.generate([prompts[0]], params)  # warm up: links, first forward
        for c in levels:
            tpots = [
                o.metrics.tpot * 1e3
                for _ in range(args.rounds)
                for o in llm.generate(prompts[:c], params)
            ]
            print(f"c={c}: TPOT median {statistics.median(tpots):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
