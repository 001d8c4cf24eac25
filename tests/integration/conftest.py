"""Integration fixtures: one real local Ray instance per session, tiny checkpoints, references."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from pdserve.cluster.launch.ray_env import init_ray

# The GGUF writers and references of the unit tests (tests/unit/_gguf_*.py) serve here too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from pdserve.engine.tiny_model import TINY_ARCHS, make_tiny_model


@pytest.fixture(scope="module")
def ray_session(request: pytest.FixtureRequest) -> Iterator[None]:
    """A local Ray instance with logical CPU slots for every actor a test starts at once,
    shared by the modules that ask for it (starting one costs seconds; the multi-node and
    chaos modules shut it down and build their own, and the next module starts it again).
    It stops after the last module that uses it, and a module that leaves actors or placement
    groups holding slots hands the next a fresh one."""
    if not ray.is_initialized():
        init_ray(namespace="pdserve-tests", num_cpus=max(8, os.cpu_count() or 1))
    yield
    if _slots_held() or not _used_later(request):
        ray.shutdown()


def _used_later(request: pytest.FixtureRequest) -> bool:
    """Whether a test after this module asks for ``ray_session``."""
    items = request.session.items
    module = request.node.path
    last = max((i for i, item in enumerate(items) if item.path == module), default=len(items))
    return any("ray_session" in getattr(item, "fixturenames", ()) for item in items[last + 1 :])


def _slots_held(wait_s: float = 10.0) -> bool:
    """Whether some CPU slot stays taken (a leaked actor or placement group) for ``wait_s``:
    killed actors give theirs back within moments."""
    deadline = time.monotonic() + wait_s
    while True:
        total = ray.cluster_resources().get("CPU", 0)
        if ray.available_resources().get("CPU", 0) >= total:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(root / arch, arch, seed=0) for arch in TINY_ARCHS}
