"""A deployment's start, bounded: Ray waits forever for resources no node has free.

Ray keeps an actor, or a placement group, that asks for more than the cluster has free pending
until something frees it: another deployment on the same cluster, a job, a node yet to join.
So ``pdserve up`` or ``LLM(...)`` beside a deployment that holds the GPUs (or the CPU slots)
would wait forever. The start runs under ``ray.start_timeout_s``; past it, what is not running
yet is named with what the cluster has free and what each worker asks for, and the caller's
clean-up kills the workers and frees their placement groups, so nothing is left holding
resources.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import ray
from ray.util.placement_group import PlacementGroup

T = TypeVar("T")


class StartTimeoutError(RuntimeError):
    """The deployment's workers were not all placed and started within the start timeout."""


async def within(seconds: float, start: Awaitable[T], pending: Callable[[], str]) -> T:
    """``start`` awaited for at most ``seconds``; past them, StartTimeoutError with
    ``pending()`` (what is still waiting, and why it may be)."""
    try:
        async with asyncio.timeout(seconds):
            return await start
    except TimeoutError:
        raise StartTimeoutError(
            f"the deployment did not start within {seconds:g} s (ray.start_timeout_s): {pending()}"
        ) from None


def waiting(
    decode_loads: Sequence[Any],
    prefill_groups: Sequence[PlacementGroup],
    asks: dict[str, dict[str, float]],
) -> str:
    """What has not started: decode replicas whose first call has not answered (``decode_loads``,
    their ObjectRefs) and prefill instances whose placement group is not placed, with the
    cluster's free resources against what each worker asks for (``asks``: pool -> resources)."""
    ready, _ = ray.wait(list(decode_loads), num_returns=len(decode_loads), timeout=0)
    done = {r.hex() for r in ready}
    decode = [j for j, ref in enumerate(decode_loads) if ref.hex() not in done]
    prefill = [i for i, pg in enumerate(prefill_groups) if not pg.wait(timeout_seconds=0)]
    parts = []
    if decode:
        parts.append(f"decode replica(s) {_ids(decode)} not running")
    if prefill:
        parts.append(f"prefill instance(s) {_ids(prefill)} not placed")
    what = " and ".join(parts) or "the router did not start"
    free, total = ray.available_resources(), ray.cluster_resources()
    have = ", ".join(
        f"{free.get(k, 0):g} of {total.get(k, 0):g} {k}" for k in _keys(asks) if k in total
    )
    asked = "; ".join(f"each {pool} worker asks for {_res(r)}" for pool, r in asks.items())
    missing = sorted(k for k in _keys(asks) if k not in total)
    lacks = f"; the cluster has no {', '.join(missing)} at all" if missing else ""
    return (
        f"{what}. The Ray cluster has {have or 'nothing asked for'} free ({asked}){lacks}. "
        "Free resources (another deployment: `pdserve down -n NAME`; `ray status` shows what "
        "is held), ask for less (fewer instances, a gpus_per_worker share), add nodes, or "
        "raise ray.start_timeout_s if loading the model takes longer"
    )


def _ids(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices)


def _keys(asks: dict[str, dict[str, float]]) -> list[str]:
    return sorted({k for r in asks.values() for k, v in r.items() if v > 0})


def _res(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if v > 0) or "nothing"
