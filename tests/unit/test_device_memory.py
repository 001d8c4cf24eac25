"""A worker's GPU memory budget: the whole GPU's figures, or its share less what a process
holds outside the caching allocator, with the allocator capped there. The CUDA calls are faked
(no GPU here): what is under test is the arithmetic and the cap handed to torch."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.device_memory import OUTSIDE_ALLOCATOR_BYTES, worker_memory

GIB = 1 << 30
TOTAL = 80 * GIB


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    seen: dict[str, object] = {}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (30 * GIB, TOTAL))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 3 * GIB)
    monkeypatch.setattr(
        torch.cuda,
        "set_per_process_memory_fraction",
        lambda fraction, index: seen.update(fraction=fraction, index=index),
    )
    return seen


def test_a_whole_gpu_reports_its_own_figures_and_is_not_capped(
    fake_gpu: dict[str, object],
) -> None:
    assert worker_memory(torch.device("cuda")) == (30 * GIB, TOTAL)
    assert fake_gpu == {}


def test_a_share_is_capped_below_it_by_what_lives_outside_the_allocator(
    fake_gpu: dict[str, object],
) -> None:
    budget = TOTAL // 2 - OUTSIDE_ALLOCATOR_BYTES
    assert worker_memory(torch.device("cuda", 0), 0.5) == (budget - 3 * GIB, budget)
    assert fake_gpu == {"fraction": budget / TOTAL, "index": 0}
    # two workers at their caps, each with its context, fit the GPU
    assert 2 * (budget + OUTSIDE_ALLOCATOR_BYTES) <= TOTAL


def test_a_share_too_small_for_a_context_says_what_to_raise(
    fake_gpu: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (GIB, 4 * GIB))
    with pytest.raises(ValueError, match="raise gpus_per_worker"):
        worker_memory(torch.device("cuda"), 0.25)
    assert fake_gpu == {}


def test_cpu_has_no_budget() -> None:
    assert worker_memory(torch.device("cpu"), 0.5) is None
