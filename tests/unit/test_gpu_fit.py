"""A deployment's workers fitted to the cluster's GPUs, before Ray is asked to place them."""

from __future__ import annotations

import pytest

from pdserve.cluster.launch.deployment import _device_slot
from pdserve.cluster.launch.gpu_fit import gpu_shortfall, with_shares, worker_groups
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
        ([1.0, 1.0], [1], False),  # a whole GPU each on one GPU: Ray would wait forever
        ([1.0, 1.0], [1, 1], True),  # one GPU on each of two nodes
        ([0.6, 0.6, 0.6], [2], False),  # 1.8 GPUs of shares, but no GPU holds two of them
        ([0.6, 0.4, 0.6, 0.4], [2], True),
        ([1.0] * 8, [4, 4], True),  # deploy/gpu-8x.yaml
        ([0.5], [0], False),
    ],
)
def test_first_fit_over_every_gpu(shares: list[float], gpus: list[float], fits: bool) -> None:
    assert (gpu_shortfall([(1, s) for s in shares], gpus) is None) == fits


def test_a_tp_group_needs_its_gpus_on_one_node() -> None:
    assert gpu_shortfall([(2, 1.0)], [2]) is None
    why = gpu_shortfall([(2, 1.0)], [1, 1])  # two GPUs, but on two nodes
    assert why is not None and "a TP group of 2 ranks on one node" in why
    assert gpu_shortfall([(2, 1.0), (1, 0.5), (1, 0.5)], [2, 1]) is None


def _config(
    prefill: float | None = None, decode: float | None = None, tp: int = 1, replicas: int = 1
) -> DeploymentConfig:
    return DeploymentConfig(
        "t",
        ModelSettings("m", device="cuda"),
        prefill=PrefillSettings(tensor_parallel_size=tp, gpus_per_worker=prefill),
        decode=DecodeSettings(instances=replicas, gpus_per_worker=decode),
    )


def test_unset_shares_take_whole_gpus_when_there_are_enough() -> None:
    c = with_shares(_config(), [2])
    assert [_device_slot(c, p) for p in ("prefill", "decode")] == [{"GPU": 1.0}] * 2


def test_unset_shares_split_one_gpu_between_a_prefill_rank_and_a_replica() -> None:
    c = with_shares(_config(), [1])  # LLM(model, device="cuda") on a one-GPU machine
    assert [_device_slot(c, p) for p in ("prefill", "decode")] == [{"GPU": 0.5}] * 2


def test_tp_ranks_keep_whole_gpus_and_replicas_share_what_is_left() -> None:
    c = with_shares(_config(tp=2, replicas=2), [3])
    assert c.prefill is not None and c.prefill.gpus_per_worker == 1.0
    assert c.decode.gpus_per_worker == 0.5


def test_given_shares_are_kept_and_a_misfit_is_refused_naming_the_knobs() -> None:
    c = with_shares(_config(prefill=0.5, decode=0.25, replicas=2), [1])
    assert (c.prefill and c.prefill.gpus_per_worker, c.decode.gpus_per_worker) == (0.5, 0.25)
    with pytest.raises(ValueError, match=r"need 2 GPUs.*has 1.*gpus_per_worker"):
        with_shares(_config(prefill=1.0, decode=1.0), [1])
    with pytest.raises(ValueError, match="has 0"):
        with_shares(_config(), [])


def test_every_prefill_rank_and_decode_replica_counts() -> None:
    c = DeploymentConfig(
        "t",
        ModelSettings("m", device="cuda"),
        PrefillSettings(instances=2, tensor_parallel_size=2, gpus_per_worker=1.0),
        DecodeSettings(instances=3, gpus_per_worker=0.5),
    )
    assert sorted(worker_groups(c)) == [(1, 0.5)] * 3 + [(2, 1.0)] * 2
