"""Chaos fixtures: a local Ray instance and a 2-prefill (TP 2), 2-decode CPU deployment of the
tiny llama started through the controller, as ``pdserve up`` starts one (so the healer runs,
and Ray restarts the controller), with its batch jobs in a temporary directory."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from _chaos import TP

from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.spec import load_spec
from pdserve.cluster.launch.controller import launch
from pdserve.cluster.launch.ray_env import init_ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chaos_spec(port: int) -> dict[str, Any]:
    return {
        "name": "chaos",
        "model": {"path": "builtin:tiny-llama", "dtype": "float32", "device": "cpu"},
        "prefill": {"instances": 2, "tensor_parallel_size": TP},
        "decode": {"instances": 2, "kv_cache": {"blocks": 512}, "kv_lease_s": 20},
        "router": {
            "max_migrations": 3,
            "max_prefill_retries": 3,
            # replaced fast (the backoff doubles with every restart of one instance), often
            # probed, and never given up on within a long run
            "restart_backoff_s": 0.05,
            "health_check_s": 0.5,
            "max_restarts": 1000,
        },
        "server": {"host": "127.0.0.1", "port": port},
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """The controller's handle and its URL."""
    if ray.is_initialized():  # another module's instance: the chaos deployment gets its own
        ray.shutdown()
    init_ray(namespace="pdserve-chaos", num_cpus=max(8, os.cpu_count() or 1))
    config = resolve(load_spec(chaos_spec(_free_port())), gpus_available=False)
    jobs: Path = tmp_path_factory.mktemp("chaos-jobs")
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, jobs_dir=str(jobs))
    )
    controller, url = launch(config, detached=False)
    try:
        yield controller, url
    finally:
        try:
            ray.get(controller.shutdown.remote(), timeout=120)
        finally:
            ray.kill(controller)
            ray.shutdown()
