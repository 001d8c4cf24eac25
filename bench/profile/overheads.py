"""Fixed costs outside the timed engine calls, measured through a real local deployment.

The spec is deployed as 1 prefill (TP 1) + 1 decode on a local Ray instance under a private
name and port, and `pdserve bench` sends rounds of c requests at once over HTTP with at most c
in flight: a round's prompts prefill in one batch and decode together, so

    TTFT (c = 1, n-token prompt) = dispatch + scale * prefill busy time (with KV sends)
        at n = 64 and 256                              -> dispatch_ms, prefill_scale
    TPOT (c) = (KV landing + (out - 1) steps at batch c) / (out - 1)
    TPOT(c) - landing / (out - 1) - decode_ms(c, ...)  -> decode_excess_ms[c], c = 1, 2, 4, 8

and the CPU the controller and the benchmark client spend per streamed token is read from
/proc around the c = 8 rounds (`stream_cpu_ms`: on a CPU host it competes with the workers).
`prefill_scale` is how much slower a prefill runs inside the deployment (an actor thread
beside Ray's own threads) than in the profiler. The decode excess is what a step costs the
deployment beyond the in-process step: streaming each token through Ray and the controller,
and the decode actor's step thread and event loop taking turns (on the 2-vCPU VM it jumps by
~10 ms from one stream to two). It is kept as measured per batch size, not fitted. The split
of the fixed TTFT cost between "before the prefill queue" and "after the forward" changes no
simulated metric (a constant shift of arrivals does not change queueing; TPOT sees it at both
ends), so all of it is `dispatch_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdserve.bench.plan.placement import DISAGGREGATED, Placement, deploy_spec
from pdserve.bench.plan.profile_model import Overheads

logger = logging.getLogger(__name__)

# Without a deployment (--quick, --overheads default, or a model with no tokenizer): the
# built-in tiny model's 1-token request over HTTP on the 2-vCPU development VM was 8.9 ms p50
# (docs/performance.md), of which ~1.5 ms is its prefill, KV landing and first decode ack.
DEFAULT_OVERHEADS = Overheads(
    dispatch_ms=7.0,
    return_ms=0.0,
    step_ms=0.3,
    source="default: docs/performance.md HTTP 1-token round trip (8.9 ms p50) less engine time",
)
PROMPT_LENS, OUTPUT_LEN, ROUNDS, WARMUPS = (64, 256), 32, 4, 2
CONCURRENCY = (1, 2, 4, 8)  # at the longer prompt
MID_CONTEXT = PROMPT_LENS[-1] + OUTPUT_LEN // 2  # a sequence's mean context over its decode


def measure_overheads(
    spec: Any,
    prefill_busy_ms: Callable[[list[int]], float],
    decode_ms: Callable[[int, int], float],
    land_ms: float,
) -> Overheads:
    """Deploy `spec` (a DeploySpec) as 1p1d locally and derive the costs (see above).

    `prefill_busy_ms(lens)`: predicted TP1 prefill with KV sending; `decode_ms(batch, Σctx)`:
    predicted in-process step. Falls back to DEFAULT_OVERHEADS, with a warning, when the
    deployment cannot start (e.g. the model has no tokenizer).
    """
    try:
        ttft, tpot, stream_cpu_ms = _run_deployment(spec)
    except Exception as e:  # a deployment is optional for a profile: fall back, say why
        logger.warning("overheads not measured (%s); using the documented defaults", e)
        return DEFAULT_OVERHEADS
    (short, t_short), (long, t_long) = sorted(ttft.items())
    p_short, p_long = prefill_busy_ms([short]), prefill_busy_ms([long])
    scale = max(1.0, (t_long - t_short) / max(p_long - p_short, 1e-9))
    excess = tuple(
        (c, max(0.0, t - land_ms / (OUTPUT_LEN - 1) - decode_ms(c, c * MID_CONTEXT)))
        for c, t in tpot.items()
    )
    return Overheads(
        dispatch_ms=max(0.0, t_short - scale * p_short),
        return_ms=0.0,
        step_ms=excess[0][1],
        decode_excess_ms=excess,
        prefill_scale=scale,
        stream_cpu_ms=stream_cpu_ms,
        source=f"measured: 1p1d over HTTP, {ROUNDS} rounds of c requests at once; TTFT p50 "
        + ", ".join(f"{n} tokens {t:.1f} ms" for n, t in ttft.items())
        + f"; TPOT p50 ({long} -> {OUTPUT_LEN} tokens) "
        + ", ".join(f"c={c} {t:.1f} ms" for c, t in tpot.items())
        + f"; controller + client CPU {stream_cpu_ms:.2f} ms a token",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_deployment(spec: Any) -> tuple[dict[int, float], dict[int, float], float]:
    """({prompt tokens: TTFT p50 ms} at c = 1, {c: TPOT p50 ms} at the longer prompt, CPU ms
    the controller and the client spent per streamed token at the highest concurrency)."""
    import ray
    import torch

    from pdserve.cluster.config.resolve import resolve
    from pdserve.cluster.config.spec import load_spec
    from pdserve.cluster.launch.controller import launch
    from pdserve.cluster.launch.ray_env import init_ray

    data = deploy_spec(spec.model_dump(mode="json"), Placement(DISAGGREGATED, 1, 1, 1))
    data["name"] = f"profile-{uuid.uuid4().hex[:8]}"
    data["server"] = {**data["server"], "host": "127.0.0.1", "port": _free_port(), "api_key": None}
    data["ray"] = {**data["ray"], "address": None}
    resolved = resolve(load_spec(data), gpus_available=torch.cuda.is_available())
    init_ray(num_cpus=4)
    try:
        actor, url = launch(resolved, detached=False)
        try:
            ttft = {n: _rounds(url, n, 1)[0] for n in PROMPT_LENS}
            tpot = {c: _rounds(url, PROMPT_LENS[-1], c)[1] for c in CONCURRENCY[:-1]}
            pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))
            cpu = _cpu_seconds(pid) + time.process_time()
            tpot[CONCURRENCY[-1]], tokens = _rounds(url, PROMPT_LENS[-1], CONCURRENCY[-1])[1:]
            cpu_ms_per_token = (_cpu_seconds(pid) + time.process_time() - cpu) * 1e3 / tokens
            return ttft, tpot, cpu_ms_per_token
        finally:
            ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.shutdown()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _rounds(url: str, prompt_len: int, concurrency: int) -> tuple[float, float, int]:
    """(TTFT p50 ms, TPOT p50 ms, tokens streamed) of ROUNDS rounds of `concurrency`
    requests at once."""
    from pdserve.bench.serve.runner import BenchConfig, run_benchmark

    config = BenchConfig(
        base_url=url, workload=f"fixed:in={prompt_len},out={OUTPUT_LEN}",
        num_prompts=ROUNDS * concurrency, max_concurrency=concurrency, num_warmups=WARMUPS,
        show_progress=False,
    )  # fmt: skip
    ok = [r for r in asyncio.run(run_benchmark(config)).records if r.success]
    if len(ok) < ROUNDS * concurrency // 2:
        raise RuntimeError(f"only {len(ok)} of {ROUNDS * concurrency} requests succeeded")
    return (
        statistics.median(r.ttft_s for r in ok) * 1e3,
        statistics.median(r.tpot_s for r in ok) * 1e3,
        sum(r.output_tokens for r in ok) + WARMUPS * OUTPUT_LEN,  # the CPU counts warm-ups
    )
