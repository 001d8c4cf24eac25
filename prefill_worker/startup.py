"""A prefill rank's start-up: its TP group (only holders of the deployment's secret join), the
size of its paged KV cache, and the leader's scheduler over that cache."""

from __future__ import annotations

import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import DeploymentConfig
from pdserve.engine.device_memory import worker_memory
from pdserve.engine.kv_cache import bytes_per_block
from pdserve.engine.parallel import TPGroup
from pdserve.engine.prefix_hash import hash_salt
from pdserve.kv_transfer.auth import GroupAuth, join_group
from pdserve.prefill_worker.scheduler import PrefillScheduler

TP_JOIN_S = 300.0  # the longest the TP group's ranks wait for one another (store, handshake)


def join_tp_group(
    deployment: DeploymentConfig,
    store: torch.distributed.TCPStore,
    rank: int,
    device: torch.device,
) -> TPGroup:
    """Join the instance's TP group through the leader's store (``prefill.tensor_parallel_size``
    ranks); only holders of the deployment's secret join (``kv_transfer.auth``)."""
    assert deployment.prefill is not None
    size = deployment.prefill.tensor_parallel_size
    backend = "nccl" if device.type == "cuda" else "gloo"
    auth = GroupAuth(deployment.link_secret, hosting=rank == 0, peers=size - 1)
    pg = join_group(store, auth, "tp", backend, rank, size, device, TP_JOIN_S)
    return TPGroup(rank, size, pg)


def num_cache_blocks(
    deployment: DeploymentConfig, config: ModelConfig, tp: TPGroup, device: torch.device
) -> int:
    """This rank's cache blocks: ``prefill.kv_cache`` of its head slice, the smallest
    count over the TP group (every rank holds the same block ids)."""
    assert deployment.prefill is not None
    d = deployment.decode
    per_block = bytes_per_block(config, tp.size, d.block_size, d.kv_cache.dtype)
    memory = worker_memory(device, deployment.prefill.gpus_per_worker or 1.0)  # a GPU, or its share
    n = deployment.prefill.kv_cache.num_blocks(per_block, memory, "prefill.kv_cache")
    if tp.size > 1:
        assert tp.pg is not None
        count = torch.tensor([n], dtype=torch.int64, device=device)
        opts = torch.distributed.AllreduceOptions()
        opts.reduceOp = torch.distributed.ReduceOp.MIN  # type: ignore[assignment]
        tp.pg.allreduce([count], opts).wait()
        n = int(count.item())
    if n < 1:
        raise ValueError(f"prefill.kv_cache holds no block of {per_block} bytes: raise it")
    return n


def leader_scheduler(deployment: DeploymentConfig, num_blocks: int) -> PrefillScheduler:
    """The leader's queue and block accounting over ``num_blocks`` of its cache; blocks hash
    with the decode replicas' salt, so both sides name a prefix alike."""
    pool, decode = deployment.prefill, deployment.decode
    assert pool is not None
    return PrefillScheduler(
        num_blocks,
        decode.block_size,
        pool.max_batch_tokens,
        pool.max_batch_size,
        chunked=pool.chunked_prefill,
        caching=deployment.prefix_caching,
        salt=hash_salt(deployment.model.path, decode.kv_cache.dtype, decode.block_size),
    )
