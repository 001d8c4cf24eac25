"""A router over fake workers, and the small drivers the router tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from _fake_decode import FakeDecode
from _fake_prefill import FakePrefill

from pdserve.engine.deploy_config import (
    DecodeSettings,
    DeploymentConfig,
    ModelSettings,
    PrefillSettings,
    RouterSettings,
)
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.prefill_pool import PrefillInstance
from pdserve.router.router import RequestTrace, Router

BLOCK = 4  # tokens per KV block in every fake


@dataclass
class FakeCluster:
    router: Router
    decodes: list[FakeDecode]
    prefills: list[FakePrefill]  # one single-rank instance each


async def fake_cluster(
    prefill: int = 1,
    decode: int = 1,
    num_blocks: int = 16,
    prefix_caching: bool = False,
    router: RouterSettings | None = None,
) -> FakeCluster:
    """``prefill=0``: colocated. ``router``: its policies (default: the deploy defaults)."""
    decodes = [FakeDecode(j, num_blocks, BLOCK, prefix_caching) for j in range(decode)]
    prefills = [FakePrefill(i, decodes) for i in range(prefill)]
    instances = [PrefillInstance(i, [p], [0]) for i, p in enumerate(prefills)]
    config = DeploymentConfig(
        "t",
        ModelSettings("fake"),
        prefill=PrefillSettings(instances=prefill) if prefill else None,
        decode=DecodeSettings(block_size=BLOCK),
        prefix_caching=prefix_caching,
        router=router or RouterSettings(),
    )
    router = Router(instances, decodes, config)
    await router.start()
    return FakeCluster(router, decodes, prefills)


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 10.0) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


async def until(cond: Callable[[], bool], what: str = "condition") -> None:
    for _ in range(5000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{what} never held")


async def consume(
    router: Router,
    request_id: str,
    prompt_len: int,
    max_tokens: int,
    tokens: list[int] | None = None,
    trace: RequestTrace | None = None,
    prompt: Sequence[int] | None = None,
) -> list[int]:
    """Every token of one request (into ``tokens`` as they come); asserts a clean finish.
    The prompt is 0, 1, ... prompt_len - 1 unless given."""
    out = [] if tokens is None else tokens
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    last = None
    ids = list(range(prompt_len)) if prompt is None else list(prompt)
    async for delta in router.generate(request_id, ids, params, trace):
        assert delta.error is None, delta.error
        out.extend(delta.token_ids)
        last = delta
    assert last is not None and last.finish_reason == "length"
    return out


def assert_all_free(decode: FakeDecode) -> None:
    """No request held and every block free, by the real block accounting."""
    assert decode.check_integrity() == 0
    assert decode.blocks.num_free_blocks == decode.blocks.num_blocks
