"""A deployment's workers fitted to the Ray cluster's GPUs, before any of them is placed.

Ray keeps an actor that asks for more than any GPU has left pending forever, so a deployment
that does not fit would hang ``pdserve up`` and ``LLM(...)``. A pool whose ``gpus_per_worker``
the spec left out gets a whole GPU per worker when the cluster has enough, else the largest
equal share that fits (1/2, 1/3, ...; a TP rank always gets a whole GPU: NCCL needs one per
rank), so ``LLM(model, device="cuda")`` runs 1P1D on one GPU as it is. Ray packs fractional
requests onto a GPU while its remainder holds them, and a prefill instance's TP ranks on one
node; first fit over every GPU of every node, biggest groups first, gives the same answer for
the shares a spec can write. It counts the cluster's GPUs, not what other deployments use of
them: a worker waiting for GPUs another deployment holds fails the start after
``ray.start_timeout_s`` (launch/start_wait.py), naming them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from pdserve.engine.deploy_config import DeploymentConfig

logger = logging.getLogger(__name__)

AUTO_SHARES = (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 6, 1 / 8)  # tried in order for unset pools


Group = tuple[int, float]  # (ranks placed together on one node, each rank's share of a GPU)


def worker_groups(config: DeploymentConfig) -> list[Group]:
    """What must be placed: each decode replica alone, each prefill instance's TP ranks on one
    node (its STRICT_PACK placement group), each rank on a GPU of its own. Unset shares count
    as whole GPUs."""
    groups = [(1, config.decode.gpus_per_worker or 1.0)] * config.decode.instances
    if config.prefill is not None:
        p = config.prefill
        groups += [(p.tensor_parallel_size, p.gpus_per_worker or 1.0)] * p.instances
    return groups


def gpu_shortfall(groups: Sequence[Group], gpus_per_node: Sequence[float]) -> str | None:
    """Why ``groups`` do not fit nodes with ``gpus_per_node`` GPUs (None when they do): first
    fit, biggest groups first, each group's ranks on distinct GPUs of one node."""
    free = [[1.0] * int(n) for n in gpus_per_node]  # per node, per GPU
    for ranks, share in sorted(groups, reverse=True):
        if not any(_take(node, ranks, share) for node in free):
            workers = sum(r for r, _ in groups)
            need = sum(r * s for r, s in groups)
            each = ", ".join(f"{s:.3g}" for s in sorted({s for _, s in groups}, reverse=True))
            tp = max(r for r, _ in groups)
            where = f" (a TP group of {tp} ranks on one node)" if tp > 1 else ""
            return (
                f"the deployment's {workers} workers need {need:.3g} GPUs ({each} each){where} "
                f"and the Ray cluster has {sum(len(n) for n in free)} on "
                f"{len(free)} node(s): share GPUs with prefill.gpus_per_worker and "
                "decode.gpus_per_worker (LLM: prefill_gpus_per_worker=, gpus_per_worker=; "
                "0.5 puts two workers on a GPU), use fewer instances, or add GPU nodes"
            )
    return None


def _take(node: list[float], ranks: int, share: float) -> bool:
    """Place ``ranks`` ranks of ``share`` on distinct GPUs of ``node`` (all or none)."""
    gpus = [i for i, f in enumerate(node) if f >= share - 1e-9][:ranks]
    if len(gpus) < ranks:
        return False
    for i in gpus:
        node[i] -= share
    return True


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
        if gpu_shortfall(worker_groups(tried), gpus_per_node) is None:
            if share < 1:
                logger.warning(
                    "%d GPU(s) for %d workers: each unset gpus_per_worker is %.3g",
                    sum(int(n) for n in gpus_per_node),
                    sum(r for r, _ in worker_groups(tried)),
                    share,
                )
            return tried
    problem = gpu_shortfall(worker_groups(tried), gpus_per_node)
    assert problem is not None
    raise ValueError(problem)


def fit_gpus(config: DeploymentConfig) -> DeploymentConfig:
    """A CUDA deployment's shares settled for the Ray cluster's live GPUs (unchanged on CPU)."""
    if config.model.device != "cuda":
        return config
    import ray

    gpus = [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return with_shares(config, gpus)
