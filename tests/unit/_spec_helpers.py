"""The deploy spec tests' shared pieces: paths, a private cache dir, spec builders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
GPU_SPEC = DEPLOY / "gpu-8x.yaml"


@pytest.fixture(autouse=True)
def cache_dir(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A private cache dir whose built-in tiny-llama is the session's prebuilt one."""
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    (tmp_path / "tiny-llama-s0").symlink_to(tiny_models["llama"], target_is_directory=True)
    yield tmp_path


def spec_dict(**sections: Any) -> dict[str, Any]:
    """A minimal valid spec (the built-in model on CPU) with `sections` merged in."""
    base: dict[str, Any] = {"name": "t", "model": {"device": "cpu", "path": "builtin:tiny-llama"}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


S = spec_dict


def spec_error(source: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(source)
    return info.value


def problems_of(data: Any) -> list[str]:
    return spec_error(data).problems


def resolve_problems(data: dict[str, Any], gpus: bool = False) -> list[str]:
    with pytest.raises(SpecError) as info:
        resolve(load_spec(data), gpus_available=gpus)
    return info.value.problems
