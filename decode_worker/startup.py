"""A decode replica's start-up: its model loaded, its paged KV cache sized from what is left
(``decode.kv_cache``), and both wrapped in a `DecodeEngine` with the deployment's limits."""

from __future__ import annotations

import torch

from pdserve.decode_worker.draft_proposer import build_draft_proposer
from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.runner import build_engine, model_limits
from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import DeploymentConfig
from pdserve.engine.device_memory import worker_memory
from pdserve.engine.kv_cache import bytes_per_block
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup
from pdserve.engine.prefix_hash import hash_salt


def load_engine(config: DeploymentConfig, instance: int, device: torch.device) -> DecodeEngine:
    """Load the model, size and allocate the paged KV cache, and wrap both in an engine."""
    d = config.decode
    cfg = ModelConfig.of(config.model)
    model = load_model(cfg, TPGroup.single(), device)  # first: the cache gets the rest
    memory = worker_memory(device, d.gpus_per_worker or 1.0)  # a GPU, or its share
    per_block = bytes_per_block(cfg, 1, d.block_size, d.kv_cache.dtype)  # scales included
    num_blocks = d.kv_cache.num_blocks(per_block, memory)
    limits = model_limits(
        model,
        num_blocks,
        d.block_size,
        max_num_seqs=d.max_num_seqs,
        max_num_batched_tokens=d.max_num_batched_tokens,
        chunked_prefill=d.chunked_prefill,
        prefix_caching=config.prefix_caching,
        prefix_salt=hash_salt(config.model.path, d.kv_cache.dtype, d.block_size),
        block_bytes=per_block,
        speculative=d.speculative,
    )
    proposer = None
    spec = d.speculative
    if spec is not None and spec.method == "draft":
        assert spec.draft_model is not None  # the spec checks it
        # its own cache, as many blocks as the target's (a small model's are smaller)
        proposer = build_draft_proposer(
            spec.draft_model, spec.draft_num_layers, model, num_blocks, d.block_size, device
        )
    return build_engine(
        model, limits, device, instance, d.kv_cache.dtype, proposer,
        attention_backend=d.attention_backend, enforce_eager=d.enforce_eager,
        cudagraph_capture_sizes=d.cudagraph_capture_sizes,
    )  # fmt: skip
