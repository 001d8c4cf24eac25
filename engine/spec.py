"""Frozen runtime specs handed to worker actors (resolved from the deploy spec or LLM args)."""

from __future__ import annotations

from dataclasses import dataclass

CHUNKED_PREFILL_BUDGET = 2048  # vLLM's default step budget with chunked prefill (serving)
WHOLE_PREFILL_BUDGET = 8192  # prompt tokens of one prefill-only step (prefill priority)


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
    # colocated mode: tokens one step computes. Chunked: decode tokens + prefill chunks; else
    # the prompts of one prefill-only step (a longer prompt runs alone).
    max_num_batched_tokens: int = WHOLE_PREFILL_BUDGET
    chunked_prefill: bool = False

    def __post_init__(self) -> None:
        problem = step_budget_problem(
            self.max_num_batched_tokens, self.max_num_seqs, self.chunked_prefill
        )
        if problem is not None:
            raise ValueError(f"max_num_batched_tokens {problem}")


def step_token_budget(max_num_batched_tokens: int | None, max_num_seqs: int, chunked: bool) -> int:
    """A colocated instance's ``max_num_batched_tokens``, or its default for None (vLLM's):
    2048 (at least ``max_num_seqs``) with chunked prefill, 8192 without."""
    if max_num_batched_tokens is None:
        if not chunked:
            return WHOLE_PREFILL_BUDGET
        return max(CHUNKED_PREFILL_BUDGET, max_num_seqs)
    problem = step_budget_problem(max_num_batched_tokens, max_num_seqs, chunked)
    if problem is not None:
        raise ValueError(f"max_num_batched_tokens {problem}")
    return max_num_batched_tokens


def step_budget_problem(
    max_num_batched_tokens: int, max_num_seqs: int, chunked: bool
) -> str | None:
    """What is wrong with a step budget (the key's name left out), or None."""
    if max_num_batched_tokens < 1:
        return f"must be >= 1, got {max_num_batched_tokens}"
    if chunked and max_num_batched_tokens < max_num_seqs:
        return (
            f"must be at least max_num_seqs ({max_num_seqs}) with chunked prefill, got "
            f"{max_num_batched_tokens}: each step decodes every running sequence first"
        )
    return None


def resolve_host(host: str) -> str:
    """``auto`` -> this node's IP as Ray reports it (inside a Ray worker), else the host given."""
    if host != "auto":
        return host
    import ray  # imported here: the engine does not otherwise depend on Ray

    return str(ray.util.get_node_ip_address())
