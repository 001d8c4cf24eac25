"""Cancellation in every phase frees every KV block, on a model slow enough to catch each phase."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from pdserve.bench.models import BenchModelSpec, make_bench_model
from pdserve.cluster import LLM, SamplingParams
from pdserve.router.phase import Phase
from pdserve.router.router import Router

pytestmark = pytest.mark.integration
LONG = 2500  # prompt tokens: prefill takes a good fraction of a second on this model


@pytest.fixture(scope="module")
def slow_model(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama big enough that each phase lasts long enough to be caught."""
    spec = BenchModelSpec(
        hidden_size=384,
        intermediate_size=1024,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        vocab_size=768,
    )
    out = make_bench_model(tmp_path_factory.mktemp("slow") / "llama", spec)
    for f in tiny_dirs["llama"].glob("*token*"):  # prompts are token ids; any tokenizer serves
        shutil.copy(f, out)
    return out


@pytest.fixture(scope="module")
def slow_llm(ray_session: None, slow_model: Path) -> Iterator[LLM]:
    with LLM(str(slow_model)) as llm:
        yield llm


async def _consume(llm: LLM, prompt: list[int], seen: list[int]) -> None:
    params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    async for delta in llm.frontend.stream(prompt, params, request_id=f"r{len(prompt)}"):
        seen.extend(delta.token_ids)


async def _until(cond: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "phase never reached"
        await asyncio.sleep(0.002)


def _run(llm: LLM, scenario: Any) -> None:
    llm._loop.run(scenario())  # the router lives on the LLM's loop: drive it there
    deadline = time.monotonic() + 30
    while llm.check_integrity() != 0:
        assert time.monotonic() < deadline, "KV blocks still held after the cancel"
        time.sleep(0.05)


def test_cancel_while_queued_for_prefill(slow_llm: LLM) -> None:
    router = slow_llm.deployment.router
    leader = slow_llm.deployment.prefill[0].leader

    async def scenario() -> None:
        long_task = asyncio.ensure_future(_consume(slow_llm, [7] * LONG, []))
        await _until(lambda: _phase_is(router, f"r{LONG}", Phase.PREFILL))
        short = asyncio.ensure_future(_consume(slow_llm, [9] * 40, []))
        await _until(lambda: _queued(leader, 40))  # behind the long prefill in the queue
        short.cancel()
        long_task.cancel()
        await asyncio.gather(short, long_task, return_exceptions=True)

    _run(slow_llm, scenario)


def test_cancel_while_prefilling_and_transferring(slow_llm: LLM) -> None:
    router = slow_llm.deployment.router
    leader = slow_llm.deployment.prefill[0].leader

    async def scenario() -> None:
        task = asyncio.ensure_future(_consume(slow_llm, [5] * LONG, []))
        await _until(lambda: _phase_is(router, f"r{LONG}", Phase.PREFILL))
        await _until(lambda: _queued(leader, 0))  # out of the queue: computing and sending
        assert router.phase(f"r{LONG}") is Phase.PREFILL
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    _run(slow_llm, scenario)


def test_cancel_while_decoding(slow_llm: LLM) -> None:
    router = slow_llm.deployment.router

    async def scenario() -> None:
        seen: list[int] = []
        task = asyncio.ensure_future(_consume(slow_llm, [3] * 64, seen))
        await _until(lambda: _true(len(seen) >= 3))
        assert router.phase("r64") is Phase.DECODE
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    _run(slow_llm, scenario)
    out = slow_llm.generate([3] * 64, SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].token_ids) == 4  # and it keeps serving


async def _phase_is(router: Router, request_id: str, phase: Phase) -> bool:
    return router.phase(request_id) is phase


async def _queued(leader: Any, tokens: int) -> bool:
    return bool(await leader.queued_tokens.remote() == tokens)


async def _true(value: bool) -> bool:
    return value


def test_prefill_dying_mid_request_frees_the_reservation(
    ray_session: None, slow_model: Path
) -> None:
    """The prefill actor dies while it computes one request (whose KV is mid-transfer) with
    another queued behind it (no KV sent yet): both fail, and decode frees both reservations."""
    with LLM(str(slow_model)) as llm:
        router = llm.deployment.router
        leader = llm.deployment.prefill[0].leader

        async def scenario() -> None:
            task = asyncio.ensure_future(_consume(llm, [5] * LONG, []))
            await _until(lambda: _phase_is(router, f"r{LONG}", Phase.PREFILL))
            queued = asyncio.ensure_future(_consume(llm, [9] * 40, []))  # no KV sent for it yet
            await _until(lambda: _queued(leader, 40))
            ray.kill(leader, no_restart=True)
            results = await asyncio.gather(task, queued, return_exceptions=True)
            assert all(isinstance(r, Exception) for r in results)  # the callers hear about it

        _run(llm, scenario)


def test_cancel_mid_chunked_prefill_frees_its_blocks(ray_session: None, slow_model: Path) -> None:
    """Colocated, 256 tokens a step: the long prompt is cancelled after some of its chunks ran
    (its K/V half written), while a short request decodes beside it and carries on."""
    with LLM(
        str(slow_model), mode="colocated", enable_chunked_prefill=True, max_num_batched_tokens=256
    ) as llm:
        decode = llm.deployment.decode[0]

        async def partial() -> bool:
            return bool((await decode.stats.remote()).partial_prefills == 1)

        async def scenario() -> None:
            seen: list[int] = []
            short = asyncio.ensure_future(_consume(llm, [3] * 40, seen))
            await _until(lambda: _true(len(seen) >= 1))  # decoding
            long_task = asyncio.ensure_future(_consume(llm, [5] * LONG, []))
            await _until(partial)  # some chunks in the cache, more to come
            long_task.cancel()
            await asyncio.gather(long_task, return_exceptions=True)
            await _until(lambda: _true(short.done()), timeout=120)
            await short  # finished normally, all its tokens
            assert len(seen) == 500

        _run(llm, scenario)
        assert llm.generate([3] * 40, SamplingParams(max_tokens=4))[0].finish_reason == "length"
        assert llm.check_integrity() == 0


@pytest.fixture(scope="module")
def chunked_llm(ray_session: None, slow_model: Path) -> Iterator[LLM]:
    """The prefill pool runs 256 tokens a step: the long prompt takes 10 steps."""
    with LLM(str(slow_model), prefill_chunked_prefill=True, max_batch_tokens=256) as llm:
        yield llm


async def _partial(leader: Any) -> bool:
    return bool((await leader.stats.remote()).partial_prefills == 1)


async def _first_token(llm: LLM, prompt: list[int], order: list[str]) -> None:
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    name = f"r{len(prompt)}"
    async for _ in llm.frontend.stream(prompt, params, request_id=name):
        if name not in order:  # the first delta carries the prefill's first token
            order.append(name)


def test_a_short_prompt_is_not_queued_behind_a_long_chunked_one(chunked_llm: LLM) -> None:
    leader = chunked_llm.deployment.prefill[0].leader

    async def scenario() -> None:
        order: list[str] = []
        long_task = asyncio.ensure_future(_first_token(chunked_llm, [5] * LONG, order))
        await _until(lambda: _partial(leader))  # some of its chunks ran, more to come
        await _first_token(chunked_llm, [9] * 40, order)
        await long_task
        assert order == ["r40", f"r{LONG}"]  # the short one's prefill finished first

    _run(chunked_llm, scenario)
    assert ray.get(leader.check_integrity.remote()) == 0


def test_a_link_failing_mid_chunks_frees_both_sides(chunked_llm: LLM) -> None:
    """The prefill rank's link to decode breaks between two chunks of a long prompt: the prompt
    fails on prefill (its cache blocks released) and on decode (its reservation freed); the
    router retries it over a new link, and it generates what an undisturbed run does."""
    leader = chunked_llm.deployment.prefill[0].leader
    prompt = [11] * LONG
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    seen: list[int] = []

    async def scenario() -> None:
        task = asyncio.ensure_future(_consume(chunked_llm, prompt, seen))
        await _until(lambda: _partial(leader))
        assert await leader.drop_link.remote(0)
        await task

    hits = ray.get(leader.stats.remote()).prefix_cache_hits
    _run(chunked_llm, scenario)
    assert ray.get(leader.check_integrity.remote()) == 0
    # the retry found the chunks the failed attempt had computed in the prefill cache
    assert ray.get(leader.stats.remote()).prefix_cache_hits > hits
    clean = chunked_llm.generate([prompt], params)[0].token_ids
    assert seen[:4] == clean and len(seen) == 500
