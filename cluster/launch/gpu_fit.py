"""A deployment's workers fitted to the Ray cluster's GPUs, before any of them is placed.

Ray keeps an actor that asks for more than any GPU has left pending forever, so a deployment
that does not fit would hang ``pdserve up`` and ``LLM(...)``. A pool whose ``gpus_per_worker``
the spec left out gets a whole GPU per worker when the cluster has enough, else the largest
equal share that fits (1/2, 1/3, ...; a TP rank always gets a whole GPU: NCCL needs one per
rank), so ``LLM(model, device="cuda")`` runs 1P1D on one GPU as it is. Ray packs fractional
requests onto a GPU while its remainder holds them; first-fit over every GPU of every node,
largest share first, gives the same answer for the shares a spec can write.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from pdserve.engine.deploy_config import DeploymentConfig

logger = logging.getLogger(__name__)

AUTO_SHARES = (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 6, 1 / 8)  # tried in order for unset pools


def worker_shares(config: DeploymentConfig) -> list[float]:
    """Each worker's share of a GPU (unset: a whole one): prefill ranks, then replicas."""
    shares = [config.decode.gpus_per_worker or 1.0] * config.decode.instances
    if config.prefill is not None:
        ranks = config.prefill.instances * config.prefill.tensor_parallel_size
        shares += [config.prefill.gpus_per_worker or 1.0] * ranks
    return shares


def gpu_shortfall(shares: Sequence[float], gpus_per_node: Sequence[float]) -> str | None:
    """Why ``shares`` do not fit GPUs grouped as ``gpus_per_node`` (None when they do)."""
    free = [1.0] * sum(int(n) for n in gpus_per_node)
    for share in sorted(shares, reverse=True):
        slot = next((i for i, f in enumerate(free) if f >= share - 1e-9), None)
        if slot is None:
            each = ", ".join(f"{s:.3g}" for s in sorted(set(shares), reverse=True))
            return (
                f"the deployment's {len(shares)} workers need {sum(shares):.3g} GPUs ({each} "
                f"each) and the Ray cluster has {len(free)}: share GPUs with "
                "prefill.gpus_per_worker and decode.gpus_per_worker (LLM: "
                "prefill_gpus_per_worker=, gpus_per_worker=; 0.5 puts two workers on a GPU), "
                "use fewer instances, or add GPU nodes"
            )
        free[slot] -= share
    return None


def with_shares(config: DeploymentConfig, gpus_per_node: Sequence[float]) -> DeploymentConfig:
    """``config`` with every unset share settled for these GPUs; ValueError if none fits."""
    prefill, decode = config.prefill, config.decode
    unset_prefill = prefill is not None and prefill.gpus_per_worker is None
    whole_ranks = prefill is not None and prefill.tensor_parallel_size > 1
    tried = config
    for share in AUTO_SHARES if unset_prefill or decode.gpus_per_worker is None else (1.0,):
        tried = dataclasses.replace(
            config,
            decode=dataclasses.replace(decode, gpus_per_worker=decode.gpus_per_worker or share),
        )
        if prefill is not None:
            rank_share = 1.0 if whole_ranks else share
            settled = prefill.gpus_per_worker or rank_share
            tried = dataclasses.replace(
                tried, prefill=dataclasses.replace(prefill, gpus_per_worker=settled)
            )
        if gpu_shortfall(worker_shares(tried), gpus_per_node) is None:
            if share < 1:
                logger.warning(
                    "%d GPU(s) for %d workers: each unset gpus_per_worker is %.3g",
                    sum(int(n) for n in gpus_per_node),
                    len(worker_shares(tried)),
                    share,
                )
            return tried
    problem = gpu_shortfall(worker_shares(tried), gpus_per_node)
    assert problem is not None
    raise ValueError(problem)


def fit_gpus(config: DeploymentConfig) -> DeploymentConfig:
    """A CUDA deployment's shares settled for the Ray cluster's live GPUs (unchanged on CPU)."""
    if config.model.device != "cuda":
        return config
    import ray

    gpus = [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return with_shares(config, gpus)
