"""Shared fixtures: tiny checkpoints of every supported architecture, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.engine.tiny_model import TINY_ARCHS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of a tiny random model with tokenizer (llama, qwen2, qwen3, mistral)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(root / arch, arch, seed=0) for arch in TINY_ARCHS}
