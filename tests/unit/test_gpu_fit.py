"""Whether a deployment's workers fit the cluster's GPUs, before Ray is asked to place them."""

from __future__ import annotations

import pytest

from pdserve.cluster.launch.gpu_fit import gpu_shortfall, worker_shares
from pdserve.engine.deploy_config import (
    DecodeSettings,
    DeploymentConfig,
    ModelSettings,
    PrefillSettings,
)


@pytest.mark.parametrize(
    ("shares", "gpus", "fits"),
    [
        ([0.5, 0.5], [1], True),  # 1P1D on one GPU (deploy/gpu-1x.yaml)
        ([1.0, 1.0], [1], False),  # the old default on one GPU: Ray would wait forever
        ([1.0, 1.0], [1, 1], True),  # one GPU on each of two nodes
        ([0.6, 0.6, 0.6], [2], False),  # 1.8 GPUs of shares, but no GPU holds two of them
        ([0.6, 0.4, 0.6, 0.4], [2], True),
        ([1.0] * 8, [4, 4], True),  # deploy/gpu-8x.yaml
        ([0.5], [0], False),
    ],
)
def test_first_fit_over_every_gpu(shares: list[float], gpus: list[float], fits: bool) -> None:
    assert (gpu_shortfall(shares, gpus) is None) == fits


def test_the_refusal_names_the_knobs() -> None:
    why = gpu_shortfall([1.0, 1.0], [1])
    assert why is not None
    assert "need 2 GPUs" in why and "has 1" in why and "gpus_per_worker" in why


def test_every_prefill_rank_and_decode_replica_counts() -> None:
    config = DeploymentConfig(
        "t",
        ModelSettings("m", device="cuda"),
        prefill=PrefillSettings(instances=2, tensor_parallel_size=2, gpus_per_worker=1.0),
        decode=DecodeSettings(instances=3, gpus_per_worker=0.5),
    )
    assert sorted(worker_shares(config)) == [0.5] * 3 + [1.0] * 4
