"""The chaos suite's parts: its settings, the streaming load, the killer, and the figures.

Plain asyncio in the test process (the Ray driver): the load streams greedy requests over the
native msgpack API while the killer SIGKILLs one worker process at a time and waits for the
healer (or Ray, for the controller) to bring it back. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
import ray

# what a request may end with besides its output: an error naming the cause
CLEAR_CAUSE = re.compile(
    r"(prefill|decode) instance \d+( rank \d+)? died"
    r"|no (prefill instance|decode replica) is alive"
    r"|router\.max_(migrations|prefill_retries)"
    r"|decode\.kv_lease_s|KV link"
)
PROMPTS = [[(11 * i + 5 * j) % 700 + 3 for j in range(6 + 9 * i)] for i in range(8)]
SAMPLING = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
REQUEST_TIMEOUT_S = 60.0  # a stream not done by then is a hang
HEALED_WITHIN_S = 90.0  # a killed worker replaced (backoff, a fresh process, its model)
CONTROLLER_BACK_S = 30.0  # a killed controller serving again (issue 13: within 30 s)
IDLE_WITHIN_S = 30.0  # every block free once the load stops (migrations, aborts, leases)
TP = 2  # each prefill instance: a leader and a follower
WORKER_KINDS = ("decode", "prefill-leader", "prefill-follower")


@dataclass(frozen=True)
class Settings:
    """``PDSERVE_CHAOS_ROUNDS`` unset: the short form (one kill of each worker kind, in a
    seeded order); set to N: the long form, N kills drawn from every kind, the controller (and
    its HTTP server) included. ``PDSERVE_CHAOS_SEED`` picks the victims and the moments."""

    kills: int
    seed: int
    lanes: int
    long: bool

    @classmethod
    def from_env(cls) -> Settings:
        rounds = os.environ.get("PDSERVE_CHAOS_ROUNDS")
        seed = int(os.environ.get("PDSERVE_CHAOS_SEED", "0"))
        if not rounds:
            return cls(kills=len(WORKER_KINDS), seed=seed, lanes=4, long=False)
        return cls(kills=int(rounds), seed=seed, lanes=6, long=True)

    def schedule(self) -> list[str]:
        """The victims' kinds, in order."""
        rng = random.Random(self.seed)
        if not self.long:
            kinds = list(WORKER_KINDS)
            rng.shuffle(kinds)
            return kinds
        # the controller one kill in six: each of its kills redeploys every worker
        return rng.choices([*WORKER_KINDS, "controller"], weights=[2, 1.5, 1.5, 1], k=self.kills)


@dataclass
class Figures:
    requests: int = 0
    completed: int = 0  # output identical to the fault-free run
    failed: int = 0  # ended with an error naming its cause
    dropped: int = 0  # connection cut by a controller kill
    hung: int = 0  # no end within REQUEST_TIMEOUT_S
    wrong: int = 0  # completed with an output unlike the fault-free one
    unclear: int = 0  # ended with an error that names no cause
    kills: Counter[str] = field(default_factory=Counter)
    leaked_blocks: int = -1  # requests holding KV blocks once idle
    job_prompts: int = 0
    job_completed: int = 0
    job_failed: int = 0
    job_lost: int = 0  # prompts of the job with no result line, or with two
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def line(self) -> str:
        kills = sum(self.kills.values())
        by_kind = ", ".join(f"{k} {n}" for k, n in sorted(self.kills.items()))
        rate = self.completed / max(self.requests - self.dropped, 1)
        return (
            f"chaos: {self.requests} requests, {kills} kills ({by_kind}), "
            f"{self.completed} completed ({rate:.1%} of those not cut by a controller kill), "
            f"{self.failed} failed, {self.dropped} dropped, {self.hung} hung, "
            f"{self.wrong} wrong, {self.unclear} unclear; leaked blocks {self.leaked_blocks}; "
            f"job {self.job_completed}/{self.job_prompts} completed, {self.job_failed} failed, "
            f"{self.job_lost} lost; {self.seconds:.0f} s"
        )


class Outage:
    """When the controller (and so the HTTP server) is down: the load waits, and connections
    cut inside the window are counted as dropped."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.up.set()
        self.epoch = 0  # controller kills so far

    def down(self) -> None:
        self.epoch += 1
        self.up.clear()


async def stream(
    client: httpx.AsyncClient, url: str, prompt: list[int]
) -> tuple[list[int] | None, str]:
    """One greedy stream: its tokens and finish reason, or None and the error's message."""
    body = msgpack.packb({"prompt": prompt, "sampling": SAMPLING})
    headers = {"content-type": "application/x-msgpack"}
    tokens: list[int] = []
    async with client.stream(
        "POST", f"{url}/pdserve/v1/stream", content=body, headers=headers
    ) as r:
        if r.status_code != 200:
            return None, f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')}"
        unpacker = msgpack.Unpacker(raw=False)
        async for chunk in r.aiter_raw():
            unpacker.feed(chunk)
            for delta in unpacker:
                if "error" in delta:
                    return None, str(delta["error"].get("message", delta["error"]))
                tokens += delta["token_ids"]
                if delta.get("finish_reason"):
                    return tokens, str(delta["finish_reason"])
    return None, "the stream ended without a finish reason"


async def reference(url: str) -> list[list[int]]:
    """Every prompt's fault-free greedy output, all streamed at once."""
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        outs = await asyncio.gather(*(stream(client, url, p) for p in PROMPTS))
    for tokens, why in outs:
        assert tokens is not None and why == "length", why
    return [t for t, _ in outs if t is not None]


async def lane(
    n: int,
    url: str,
    ref: list[list[int]],
    figures: Figures,
    outage: Outage,
    stop: asyncio.Event,
    seed: int,
) -> None:
    """Stream one request after another until ``stop``, recording each one's outcome."""
    rng = random.Random(seed * 1000 + n)
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=5)) as client:
        while not stop.is_set():
            await asyncio.wait_for(outage.up.wait(), CONTROLLER_BACK_S + HEALED_WITHIN_S)
            i = rng.randrange(len(PROMPTS))
            epoch = outage.epoch
            figures.requests += 1
            try:
                tokens, why = await asyncio.wait_for(
                    stream(client, url, PROMPTS[i]), REQUEST_TIMEOUT_S
                )
            except TimeoutError:
                figures.hung += 1
                continue
            except httpx.TransportError as e:  # the server's connection is gone
                if outage.epoch != epoch or not outage.up.is_set():
                    figures.dropped += 1
                else:
                    figures.unclear += 1
                    figures.errors[f"{type(e).__name__}: {e}"] += 1
                continue
            if tokens is not None:
                if tokens == ref[i] and why == "length":
                    figures.completed += 1
                else:
                    figures.wrong += 1
                    figures.errors[f"prompt {i}: {tokens} ({why}), expected {ref[i]}"] += 1
            elif CLEAR_CAUSE.search(why):
                figures.failed += 1
                figures.errors[why] += 1
            elif outage.epoch != epoch or not outage.up.is_set():
                figures.dropped += 1  # e.g. a 503 from a controller still deploying
            else:
                figures.unclear += 1
                figures.errors[why] += 1


async def call(ref: Any, timeout: float = 30.0) -> Any:
    """A Ray call's result from the event loop, bounded."""
    return await asyncio.to_thread(ray.get, ref, timeout=timeout)


async def pid_of(actor: Any) -> int:
    return int(await call(actor.__ray_call__.remote(lambda _: os.getpid())))


async def serving_status(controller: Any, url: str, within: float) -> dict[str, Any]:
    """The controller's status once /health answers, it serves and every instance is up."""
    deadline = time.monotonic() + within
    last: Any = None
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                healthy = (await client.get(f"{url}/health")).status_code == 200
                if healthy:
                    last = await call(controller.status.remote(), timeout=10)
                    if last["state"] == "serving" and {
                        row["state"] for row in last["prefill"] + last["decode"]
                    } == {"up"}:
                        return last  # type: ignore[no-any-return]
            except (httpx.TransportError, ray.exceptions.RayError, KeyError) as e:
                last = e
            await asyncio.sleep(0.2)
    raise AssertionError(f"not serving with every instance up within {within} s: {last}")


async def kill(
    kind: str, controller: Any, url: str, rng: random.Random, outage: Outage, tp: int
) -> None:
    """SIGKILL one process of ``kind`` (an instance the status shows up), then wait until it
    is back: replaced by the healer, or for the controller restarted by Ray and redeployed."""
    before = await serving_status(controller, url, HEALED_WITHIN_S)
    handles = await call(controller.debug_handles.remote())
    if kind == "controller":
        victim, pool = controller, None
    elif kind == "decode":
        victim, pool = rng.choice(handles["decode"]), "decode"
    else:
        instance = rng.randrange(len(handles["prefill"]) // tp)
        rank = 0 if kind == "prefill-leader" else rng.randrange(1, tp)
        victim, pool = handles["prefill"][instance * tp + rank], "prefill"
    pid = await pid_of(victim)
    if kind == "controller":
        outage.down()
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    if pool is None:
        await serving_status(controller, url, CONTROLLER_BACK_S)
        outage.up.set()
        return
    deadline = start + HEALED_WITHIN_S
    while True:
        status = await serving_status(controller, url, max(deadline - time.monotonic(), 1))
        if status["recovery"]["restarts"][pool] > before["recovery"]["restarts"][pool]:
            return
        assert time.monotonic() < deadline, f"{kind} (pid {pid}) not replaced: {status}"
        await asyncio.sleep(0.2)


async def idle_leak(controller: Any) -> int:
    """Requests still holding KV blocks on any live decode replica or prefill leader, once
    they have had ``IDLE_WITHIN_S`` to let go (0 is the only right answer)."""
    deadline = time.monotonic() + IDLE_WITHIN_S
    while True:
        held = int(await call(controller.check_integrity.remote()))
        status = await call(controller.status.remote())
        busy = sum(r["reserved"] + r["running"] + r["waiting"] for r in status["decode"])
        if (held == 0 and busy == 0) or time.monotonic() > deadline:
            return max(held, busy)
        await asyncio.sleep(0.2)
