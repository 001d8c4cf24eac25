"""Load snapshots the workers report and the router's dispatch policies read (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrefillLoad:
    """What the router knows about one prefill instance's queue."""

    instance: int
    queued_tokens: int
    queued_requests: int


@dataclass(frozen=True)
class PrefillStats:
    """A prefill instance's queue and prefix cache, for status displays and tests."""

    queued_tokens: int  # prompt tokens not computed yet
    prompts: int  # prompts held: queued or part-way
    partial_prefills: int  # prompts part-way through their chunked prefill
    cache_blocks: int  # blocks its prefix cache can hold (0: prefix caching off)
    cached_blocks: int  # blocks findable in the prefix cache (held or evictable)
    prefix_cache_queries: int  # prompt tokens looked up, total since start (vLLM's name)
    prefix_cache_hits: int  # of those, tokens found cached: not computed


@dataclass(frozen=True)
class DecodeLoad:
    """What the router knows about one decode replica's KV cache and batch."""

    instance: int
    free_blocks: int
    total_blocks: int
    running: int
    waiting: int


@dataclass(frozen=True)
class DecodeStats:
    """A decode replica's counters, for status displays and tests."""

    load: DecodeLoad
    reserved: int  # requests whose KV is still on its way
    preemptions: int  # total since start
    links: tuple[str, ...]  # KV links currently receiving
    partial_prefills: int = 0  # colocated: prompts part-way through their chunked prefill
    cached_blocks: int = 0  # blocks findable in the prefix cache (held or evictable)
    prefix_cache_queries: int = 0  # prompt tokens looked up, total since start (vLLM's name)
    prefix_cache_hits: int = 0  # of those, tokens found cached
    leases_expired: int = 0  # reservations freed because their KV never came (kv_lease_s)
    transfers_stalled: int = 0  # transfers aborted because their batch stalled (kv_lease_s)
    # speculative decoding's counters (engine.speculative.SpecCounters.as_dict); {} when off
    spec: dict[str, float] = field(default_factory=dict)
    # KV bytes received since start, by the link backend that moved them (kv_transfer.peers)
    kv_bytes_by_backend: dict[str, int] = field(default_factory=dict)
