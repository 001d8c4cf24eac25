"""Chaos: under a steady load of greedy streams, SIGKILL one process after another (a decode
replica, a prefill leader, a prefill TP follower; in the long form the controller and its HTTP
server too) at seeded random moments, each once its predecessor is back, and check that

- every request completes with the fault-free output or ends with an error naming its cause
  (a controller kill may cut the connections it holds: counted as dropped), none hangs;
- at least 99% of the requests not cut by a controller kill complete (the short form, a dozen
  kills short of the long form's, asserts 95%: a kill landing in a prefill retry's window can
  exhaust one request's retries, and a few dozen requests make one such request 3%);
- every killed worker is replaced (healer), a killed controller serves again within 30 s;
- a batch job submitted before the first kill loses no prompt and repeats none;
- once the load stops, no live decode replica or prefill leader holds a block.

Short form (``make test``): one kill of each worker kind. Long form (``make chaos``):
``PDSERVE_CHAOS_ROUNDS=N`` kills; ``PDSERVE_CHAOS_SEED`` picks victims and moments. The figures
are printed at the end (``-s`` shows them)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from _chaos import (
    CLEAR_CAUSE,
    PROMPTS,
    SAMPLING,
    TP,
    Figures,
    Outage,
    Settings,
    idle_leak,
    kill,
    lane,
    reference,
    serving_status,
)

from pdserve.cluster import Client

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

JOB_WITHIN_S = 300.0


def _check_job(client: Client, job_id: str, ref: list[list[int]], figures: Figures) -> None:
    job = client.job(job_id)
    info = job.wait(timeout=JOB_WITHIN_S)
    assert info["state"] == "completed", info
    results = job.results()
    indexes = [r["index"] for r in results]
    missing_or_extra = set(range(len(ref))) ^ set(indexes)
    figures.job_lost = len(missing_or_extra) + len(indexes) - len(set(indexes))
    for r in results:
        if r.get("error"):
            figures.job_failed += 1
            assert CLEAR_CAUSE.search(r["error"]), r
        else:
            assert r["token_ids"] == ref[r["index"]], r
            figures.job_completed += 1


async def _chaos(controller: Any, url: str, settings: Settings, figures: Figures) -> None:
    rng = random.Random(settings.seed)
    ref = await reference(url)
    assert await reference(url) == ref, "the fault-free run is not deterministic"
    client = Client(url, timeout=30)
    job = await asyncio.to_thread(
        client.submit_job, [list(p) for p in PROMPTS] * 2, name="chaos", **SAMPLING
    )
    outage, stop = Outage(), asyncio.Event()
    lanes = [
        asyncio.create_task(lane(n, url, ref, figures, outage, stop, settings.seed))
        for n in range(settings.lanes)
    ]
    try:
        for kind in settings.schedule():
            await asyncio.sleep(rng.uniform(0.3, 3.0))  # a random point of the load
            await kill(kind, controller, url, rng, outage, TP)
            figures.kills[kind] += 1
        await asyncio.sleep(2.0)  # the replacements serve the load
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*lanes, return_exceptions=True), 120)
    for task in lanes:  # a lane's own failure (a bound it ran past) fails the test
        task.result()
    await serving_status(controller, url, 60)
    figures.leaked_blocks = await idle_leak(controller)
    figures.job_prompts = 2 * len(PROMPTS)
    await asyncio.to_thread(_check_job, client, job.id, ref * 2, figures)
    client.close()


def test_chaos(deployment: tuple[Any, str]) -> None:
    controller, url = deployment
    settings = Settings.from_env()
    figures = Figures()
    start = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(_chaos(controller, url, settings, figures), 1800))
    finally:
        figures.seconds = time.monotonic() - start
        print("\n" + figures.line())
        for message, n in figures.errors.most_common(10):
            print(f"  {n} x {message[:300]}")
    assert figures.hung == 0
    assert figures.wrong == 0 and figures.unclear == 0, figures.errors
    assert figures.leaked_blocks == 0
    assert figures.job_lost == 0
    assert sum(figures.kills.values()) == settings.kills
    counted = figures.requests - figures.dropped
    assert counted >= 10 * settings.kills, "too little load to judge"
    bound = 0.99 if settings.long else 0.95
    assert figures.completed >= bound * counted, figures.line()
