"""Integration fixtures: one real local Ray instance per session, tiny checkpoints, references."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from pdserve.cluster.launch.ray_env import init_ray

# The GGUF writers and references of the unit tests (tests/unit/_gguf_*.py) serve here too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from pdserve.engine.tiny_model import TINY_ARCHS, make_tiny_model


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A local Ray instance per test module (the multi-node module builds its own cluster), with
    logical CPU slots for every actor a test starts at once."""
    init_ray(namespace="pdserve-tests", num_cpus=max(8, os.cpu_count() or 1))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(root / arch, arch, seed=0) for arch in TINY_ARCHS}
