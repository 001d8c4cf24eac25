"""How much GPU memory a worker may count on: the whole GPU, or its share of one.

With ``gpus_per_worker`` below 1, Ray places several workers on one GPU (fractional GPUs); Ray
only counts the fractions, it does not divide the memory. So a worker with a share caps its
caching allocator at that share (``set_per_process_memory_fraction``) and sizes its KV cache
from its share less what it holds itself (the weights, loaded first), not from the GPU's free
memory, which its neighbours are filling at the same time. The cap covers only the caching
allocator: each process also holds its CUDA context, cuBLAS/NCCL workspaces and loaded kernels
outside it, so a share's allocator budget leaves ``OUTSIDE_ALLOCATOR_BYTES`` for those (workers
that all grew to their caps would otherwise overrun the GPU with a raw cudaMalloc failure).
"""

from __future__ import annotations

import torch

# a process's GPU memory outside the caching allocator: the CUDA context (~0.5 GiB on an H100),
# cuBLAS and NCCL workspaces, compiled kernels
OUTSIDE_ALLOCATOR_BYTES = 1 << 30


def worker_memory(device: torch.device, share: float = 1.0) -> tuple[int, int] | None:
    """(free, total) bytes for sizing a ``memory_fraction`` KV cache on ``device`` (None off
    CUDA): the GPU's own figures for a whole GPU, else the share's."""
    if device.type != "cuda":
        return None
    # a worker's device is "cuda" (Ray shows it one GPU); the allocator cap wants an index
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    if share >= 1:
        return free, total
    budget = int(total * share) - OUTSIDE_ALLOCATOR_BYTES
    if budget <= 0:
        raise ValueError(
            f"a {share:.3g} share of this GPU's {total / 2**30:.1f} GiB leaves nothing beyond a "
            "process's CUDA context: raise gpus_per_worker"
        )
    torch.cuda.set_per_process_memory_fraction(budget / total, index)
    return max(budget - torch.cuda.memory_reserved(index), 0), budget
