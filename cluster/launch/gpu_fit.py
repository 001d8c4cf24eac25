"""Whether a deployment's workers fit the Ray cluster's GPUs, checked before any is placed.

Ray keeps an actor that asks for more than any node has pending forever, so a deployment that
does not fit would hang ``pdserve up`` and ``LLM(...)``. Ray packs fractional GPU requests onto
one GPU while its remainder holds the request; first-fit over every GPU of every node, largest
share first, gives the same answer for the shares a spec can write.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.engine.deploy_config import DeploymentConfig


def worker_shares(config: DeploymentConfig) -> list[float]:
    """Each worker's share of a GPU: every prefill rank, then every decode replica."""
    shares = [config.decode.gpus_per_worker] * config.decode.instances
    if config.prefill is not None:
        ranks = config.prefill.instances * config.prefill.tensor_parallel_size
        shares += [config.prefill.gpus_per_worker] * ranks
    return shares


def gpu_shortfall(shares: Sequence[float], gpus_per_node: Sequence[float]) -> str | None:
    """Why ``shares`` do not fit GPUs grouped as ``gpus_per_node`` (None when they do)."""
    free = [1.0] * sum(int(n) for n in gpus_per_node)
    for share in sorted(shares, reverse=True):
        slot = next((i for i, f in enumerate(free) if f >= share - 1e-9), None)
        if slot is None:
            need = sum(shares)
            return (
                f"the deployment's {len(shares)} workers need {need:g} GPUs "
                f"({', '.join(f'{s:g}' for s in sorted(set(shares), reverse=True))} each) and "
                f"the Ray cluster has {len(free)}: share GPUs with prefill.gpus_per_worker and "
                "decode.gpus_per_worker (LLM: prefill_gpus_per_worker=, gpus_per_worker=; "
                "0.5 puts two workers on a GPU), use fewer instances, or add GPU nodes"
            )
        free[slot] -= share
    return None


def check_gpu_fit(config: DeploymentConfig) -> None:
    """Raise ValueError when a CUDA deployment's workers cannot all be placed now."""
    if config.model.device != "cuda":
        return
    import ray

    gpus = [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    problem = gpu_shortfall(worker_shares(config), gpus)
    if problem is not None:
        raise ValueError(problem)
