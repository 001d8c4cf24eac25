"""Tensor parallelism: which heads a rank holds, and the process group its all-reduces go through."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    """One rank's view of its tensor-parallel group; size 1 needs no process group."""

    rank: int
    size: int
    pg: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"TP rank {self.rank} is outside a group of size {self.size}")
        if self.size > 1 and self.pg is None:
            raise ValueError(f"TP size {self.size} needs a process group (pg); got None")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x across ranks in place and return it; identity for a single rank."""
        if self.size == 1:
            return x
        assert self.pg is not None
        self.pg.allreduce([x]).wait()
        return x

    @classmethod
    def single(cls) -> TPGroup:
        return cls(rank=0, size=1)


def check_tp_size(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Raise ValueError unless tp_size splits the query heads and the KV heads evenly."""
    if tp_size < 1 or num_heads % tp_size != 0:
        raise ValueError(
            f"tensor-parallel size {tp_size} must divide the model's {num_heads} attention "
            "heads; pick a size that does"
        )
    if num_kv_heads % tp_size != 0 and tp_size % num_kv_heads != 0:
        raise ValueError(
            f"tensor-parallel size {tp_size} and the model's {num_kv_heads} KV heads must "
            "divide one another; pick a size that does"
        )


def kv_head_range(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """KV heads [start, end) held by tp_rank.

    With fewer KV heads than ranks, tp_size // num_kv_heads consecutive ranks share (replicate)
    one head, which is the head their query heads attend with.
    """
    if num_kv_heads >= tp_size:
        per_rank = num_kv_heads // tp_size
        return tp_rank * per_rank, (tp_rank + 1) * per_rank
    replicas = tp_size // num_kv_heads
    head = tp_rank // replicas
    return head, head + 1


def is_kv_sender(num_kv_heads: int, tp_rank: int, tp_size: int) -> bool:
    """True for exactly one rank per distinct KV head range: the first of its replicas."""
    if num_kv_heads >= tp_size:
        return True
    return tp_rank % (tp_size // num_kv_heads) == 0


def make_process_group(
    backend: str,
    store: dist.Store,
    rank: int,
    size: int,
    timeout_s: float = 1800,
) -> dist.ProcessGroup:
    """A process group on `store`, built directly (not init_process_group).

    A process holds several groups at once (its TP group, KV links), so none of them may be
    the global default group. Give each group its own store or a PrefixStore. Use its verbs
    directly: pg.allreduce([t]).wait(), pg.send([t], dst, tag).wait(), pg.recv(...).
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        impl: Any = dist.ProcessGroupGloo(store, rank, size, timeout)
        kind, device = dist.ProcessGroup.BackendType.GLOO, torch.device("cpu")
    elif backend == "nccl":
        if not dist.is_nccl_available():
            raise ValueError("backend 'nccl' needs a CUDA build of torch; use 'gloo' on CPU")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        impl = dist.ProcessGroupNCCL(store, rank, size, options)
        kind, device = dist.ProcessGroup.BackendType.NCCL, torch.device("cuda")
    else:
        raise ValueError(f"unknown process-group backend {backend!r}; use 'gloo' or 'nccl'")
    # Wrap the backend in a ProcessGroup, as torch's own group factory does, so callers get
    # the typed ProcessGroup verbs.
    pg = dist.ProcessGroup(store, rank, size)
    pg._register_backend(device, kind, impl)
    pg._set_default_backend(kind)
    return pg
