"""TTFT breakdown and end-to-end overhead through a real deployment.

1. TTFT breakdown (in-process LLM, one request at a time, so nothing queues behind anything):
   prefill compute alone (the model's forward in this process, the baseline), then through the
   cluster: prefill queue, prefill compute incl. layer-by-layer KV sends (and, of it, the time
   the prefill waited after its forward pass for the last sends to leave: the transfer that
   compute did not hide), KV transfer as the decode side saw it, TTFT, and the first decode
   step (E2E of a 2-token request minus TTFT).
2. HTTP overhead: a 1-token request's latency through the OpenAI endpoint, p50/p99, next to
   the same request's TTFT inside the cluster.

    python -m pdserve.bench.micro.ttft_bench --model small --prompt-len 1024 --requests 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import ray
import torch
from tqdm import tqdm

from pdserve.bench.micro.engine_timers import make_prompts, pdserve_prefill
from pdserve.bench.models import load_pdserve, resolve_model
from pdserve.cluster import LLM, SamplingParams
from pdserve.engine.tiny_model import default_tiny_model


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _with_tokenizer(model: Path) -> Path:
    """Bench checkpoints have no tokenizer; prompts are token ids, so the tiny one serves."""
    if not (model / "tokenizer.json").exists():
        for f in default_tiny_model().glob("*token*"):
            shutil.copy(f, model)
    return model


def ttft_breakdown(model: Path, prompt_len: int, n: int, threads: int) -> dict[str, float]:
    model = _with_tokenizer(model)
    torch.set_num_threads(threads)  # the baseline gets the threads a prefill actor gets
    prompts = make_prompts(n, prompt_len, 500, seed=1)
    local = load_pdserve(model)
    pdserve_prefill(local, prompts[:1])  # warm-up
    alone = [pdserve_prefill(local, [p]).seconds for p in tqdm(prompts, desc="prefill alone")]
    del local
    rows: dict[str, list[float]] = {
        k: [] for k in ("queue", "prefill+send", "kv_send_tail", "transfer", "ttft", "first_step")
    }
    with LLM(str(model), dtype="float32", num_threads=threads) as llm:
        two = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        llm.generate(prompts[0], two)  # warm-up: links, caches
        for p in tqdm(prompts, desc="through the cluster"):
            m = llm.generate(p, two)[0].metrics
            rows["queue"].append(m.queue_s)
            rows["prefill+send"].append(m.prefill_s)
            rows["kv_send_tail"].append(m.kv_wait_s)
            rows["transfer"].append(m.transfer_s)
            rows["ttft"].append(m.ttft)
            rows["first_step"].append(m.e2e - m.ttft)
    out = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in rows.items()}
    out["prefill_alone_ms"] = statistics.median(alone) * 1e3
    out["ttft_over_prefill"] = out["ttft_ms"] / out["prefill_alone_ms"]
    return out


def http_overhead(model: Path, n: int) -> dict[str, float]:
    from pdserve.cluster.config.resolve import resolve
    from pdserve.cluster.config.spec import load_spec
    from pdserve.cluster.launch.controller import launch
    from pdserve.cluster.launch.ray_env import init_ray

    spec = {
        "name": "bench-http",
        "model": {"path": str(model), "served_name": "bench"},
        "server": {"port": 8765},
    }
    init_ray()
    actor: Any
    actor, url = launch(resolve(load_spec(spec), gpus_available=False), detached=False)
    body = {"model": "bench", "prompt": [5, 6, 7, 8], "max_tokens": 1, "temperature": 0}
    lat = []
    try:
        with httpx.Client(timeout=60) as client:
            for _ in range(5):
                client.post(f"{url}/v1/completions", json=body).raise_for_status()
            for _ in tqdm(range(n), desc="1-token requests over HTTP"):
                start = time.perf_counter()
                client.post(f"{url}/v1/completions", json=body).raise_for_status()
                lat.append(time.perf_counter() - start)
    finally:
        ray.get(actor.shutdown.remote(), timeout=60)
        ray.shutdown()
    return {"http_1tok_p50_ms": _pct(lat, 50) * 1e3, "http_1tok_p99_ms": _pct(lat, 99) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="small", help="tiny, small or a model directory")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--requests", type=int, default=10, help="TTFT samples (median reported)")
    p.add_argument("--http-requests", type=int, default=200, help="1-token HTTP samples")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker and baseline")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args()
    model = resolve_model(args.model)
    result = ttft_breakdown(model, args.prompt_len, args.requests, args.threads)
    result |= http_overhead(resolve_model("tiny"), args.http_requests)
    for key, value in result.items():
        print(f"{key:>22}: {value:9.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
