"""``pdserve status``'s rows: one per prefill instance and per decode replica, as plain data.

Each row joins what the router knows (queues, cached-block estimates), what the healer knows
(state, restarts) and what the worker reported (its stats, or the error it answered with).
"""

from __future__ import annotations

from typing import Any

from pdserve.cluster.launch.healer import Healer
from pdserve.engine.load import DecodeStats, PrefillStats
from pdserve.router.prefill_pool import PrefillInstance

Estimates = dict[str, dict[int, int]]  # the router's cached-block estimates, by pool


def prefill_row(
    p: PrefillInstance, stats: PrefillStats | BaseException, healer: Healer, estimates: Estimates
) -> dict[str, Any]:
    """The router's view holds the queue counters, the leader its cache."""
    return {
        "instance": p.index,
        "state": healer.state("prefill", p.index),
        "restarts": healer.restarted["prefill", p.index],
        "tp": len(p.ranks),
        "queued_requests": p.queued_requests,
        "queued_tokens": p.queued_tokens,
        **_prefill_cache(stats),
        **_estimate(estimates, "prefill", p.index),
    }


def decode_row(
    i: int, s: DecodeStats | BaseException, healer: Healer, estimates: Estimates
) -> dict[str, Any]:
    if isinstance(s, BaseException):
        return {"instance": i, "state": healer.state("decode", i), "error": type(s).__name__}
    return {
        "instance": s.load.instance,
        "state": healer.state("decode", i),
        "restarts": healer.restarted["decode", i],
        "kv_used_blocks": s.load.total_blocks - s.load.free_blocks,
        "kv_total_blocks": s.load.total_blocks,
        "kv_cached_blocks": s.cached_blocks,
        **_estimate(estimates, "decode", i),
        "prefix_hit_rate": _rate(s.prefix_cache_hits, s.prefix_cache_queries),
        "running": s.load.running,
        "waiting": s.load.waiting,
        "reserved": s.reserved,
        "preemptions": s.preemptions,
        "links": len(s.links),
        "kv_backends": ",".join(sorted(s.kv_bytes_by_backend)) or "-",
        **s.spec,
    }


def _estimate(estimates: Estimates, pool: str, i: int) -> dict[str, int]:
    """The router's estimate of the instance's cached blocks, when it keeps one."""
    if pool not in estimates:
        return {}
    return {"router_cached_blocks": estimates[pool].get(i, 0)}


def _prefill_cache(stats: PrefillStats | BaseException) -> dict[str, Any]:
    """A prefill leader's prefix cache for status (its error's name when it did not answer)."""
    if isinstance(stats, BaseException):
        return {"error": type(stats).__name__}
    return {
        "kv_total_blocks": stats.cache_blocks,
        "kv_cached_blocks": stats.cached_blocks,
        "prefix_hit_rate": _rate(stats.prefix_cache_hits, stats.prefix_cache_queries),
    }


def _rate(hits: int, queries: int) -> float | None:
    """Prompt tokens found in the prefix cache per token looked up (None before any)."""
    return round(hits / queries, 3) if queries else None
