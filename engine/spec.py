"""Frozen runtime specs handed to worker actors (resolved from the deploy spec or LLM args)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSpec:
    """What every worker of a deployment shares."""

    model: str
    dtype: str = "auto"
    device: str = "cpu"  # "cpu" or "cuda" (resolved from "auto" before actors start)
    max_model_len: int | None = None
    num_threads: int = 1  # torch intra-op threads per actor on CPU
    kv_backend: str = "auto"
    block_size: int = 16
    # Address the workers' rendezvous stores (TP group, KV links) bind to; "auto" = the node's
    # IP as Ray knows it, which is what peers on other nodes can reach.
    host: str = "auto"


@dataclass(frozen=True)
class PrefillSpec:
    instance: int
    tp_rank: int
    tp_size: int
    max_batch_tokens: int = 8192
    max_batch_size: int = 64


@dataclass(frozen=True)
class DecodeSpec:
    instance: int
    max_num_seqs: int = 64
    num_blocks: int | None = None  # None: from kv_cache_bytes
    kv_cache_bytes: int = 512 << 20
    kv_cache_memory_fraction: float | None = None  # CUDA: share of GPU memory (weights included)
    # colocated mode: prompt-token budget of one local prefill batch
    max_prefill_tokens: int = 8192


def resolve_host(host: str) -> str:
    """``auto`` -> this node's IP as Ray reports it (inside a Ray worker), else the host given."""
    if host != "auto":
        return host
    import ray  # imported here: the engine does not otherwise depend on Ray

    return str(ray.util.get_node_ip_address())
