"""The decode worker's step loop survives a bug outside the forward pass: the requests it held
fail with an error, their blocks are freed, and the next request is served."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.deploy_config import (
    DecodeSettings,
    DeploymentConfig,
    KVCacheSize,
    ModelSettings,
)
from pdserve.engine.request import DecodeRequest, StepDelta
from pdserve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


async def _collect(worker: DecodeWorker, tid: int) -> list[StepDelta]:
    out = []
    async for delta in worker.stream(tid):
        out.append(delta)
    return out


def test_step_loop_error_fails_held_requests_and_keeps_serving(
    tiny_models: dict[str, Path],
) -> None:
    model = ModelSettings(str(tiny_models["llama"]), host="127.0.0.1", max_model_len=256)
    decode = DecodeSettings(kv_cache=KVCacheSize(blocks=32))
    worker = DecodeWorker(DeploymentConfig("t", model, decode=decode), instance=0)
    real_plan = worker.engine.plan
    calls = {"n": 0}

    def flaky_plan():  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("boom")
        return real_plan()

    worker.engine.plan = flaky_plan  # type: ignore[method-assign]

    async def scenario() -> tuple[list[StepDelta], list[StepDelta]]:
        prompt = tuple(range(5, 25))
        blocks, _ = await worker.reserve(DecodeRequest(1, "a", prompt, GREEDY, local_prefill=True))
        assert blocks is not None
        failed = await asyncio.wait_for(_collect(worker, 1), 30)
        blocks, _ = await worker.reserve(DecodeRequest(2, "b", prompt, GREEDY, local_prefill=True))
        assert blocks is not None
        served = await asyncio.wait_for(_collect(worker, 2), 30)
        return failed, served

    failed, served = asyncio.run(scenario())
    assert failed[-1].error is not None and "KeyError" in failed[-1].error
    assert served[-1].finish_reason == "length"
    assert sum(len(d.token_ids) for d in served) == 4
    assert asyncio.run(worker.check_integrity()) == 0
    assert worker.engine.blocks.num_free_blocks == worker.engine.blocks.num_blocks
