"""The consumer goes away in each phase of a request: every exit frees the decode blocks.

Decode steps are held where a request could otherwise finish by itself, so a skipped abort
leaves blocks held and the final checks fail.
"""

from __future__ import annotations

import asyncio
from typing import Any

from _fake_cluster import assert_all_free, consume, fake_cluster, run, until
from _fake_decode import FakeDecode

from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.phase import Phase


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _aborts(decode: FakeDecode) -> list[tuple[object, ...]]:
    return [call for call in decode.calls if call[0] == "abort"]


def test_cancel_while_reserving_releases_the_late_reservation() -> None:
    async def scenario() -> None:
        c = await fake_cluster()
        decode = c.decodes[0]
        decode.reserving.clear()  # the reserve call is in flight when the caller goes away
        task = asyncio.ensure_future(consume(c.router, "a", 10, 3))
        await until(lambda: bool(decode.calls), "reserve sent")
        await _cancel(task)
        decode.reserving.set()  # decode reserves anyway, as an actor would
        await until(lambda: bool(_aborts(decode)) and not decode.held(), "late release")
        assert _aborts(decode) == [("abort", 1, False)]
        assert_all_free(decode)

    run(scenario)


def test_cancel_while_waiting_for_links() -> None:
    async def scenario() -> None:
        c = await fake_cluster()
        decode, prefill = c.decodes[0], c.prefills[0]
        prefill.connecting.clear()
        task = asyncio.ensure_future(consume(c.router, "a", 10, 3))
        await until(lambda: bool(prefill.calls), "link being joined")
        assert c.router.phase("a") is Phase.RESERVED
        await _cancel(task)
        assert _aborts(decode) == [("abort", 1, False)]
        assert_all_free(decode)
        prefill.connecting.set()  # the link is still made, and the next request uses it
        assert len(await consume(c.router, "b", 10, 3)) == 3
        assert len(decode.links) == 1
        assert_all_free(decode)

    run(scenario)


def test_cancel_while_queued_for_prefill() -> None:
    async def scenario() -> None:
        c = await fake_cluster()
        decode, prefill = c.decodes[0], c.prefills[0]
        prefill.running.clear()
        task = asyncio.ensure_future(consume(c.router, "a", 10, 3))
        await until(lambda: bool(prefill.queue), "prompt queued")
        assert c.router.phase("a") is Phase.PREFILL
        await _cancel(task)
        assert not prefill.queue  # taken out of the prefill queue
        assert _aborts(decode) == [("abort", 1, False)]  # nothing will land: freed at once
        assert_all_free(decode)
        assert c.router.prefill[0].queued_requests == 0

    run(scenario)


def test_cancel_while_prefilling_frees_once_the_kv_has_landed() -> None:
    async def scenario() -> None:
        c = await fake_cluster()
        decode, prefill = c.decodes[0], c.prefills[0]
        prefill.sending.clear()
        decode.stepping.clear()
        task = asyncio.ensure_future(consume(c.router, "a", 10, 50))
        await until(lambda: bool(prefill.transferring), "KV on its way")
        await _cancel(task)
        assert _aborts(decode) == [("abort", 1, True)]
        assert decode.held() == {1}  # its blocks may still be written: kept until it lands
        prefill.sending.set()
        await until(lambda: not decode.held(), "freed after landing")
        assert_all_free(decode)

    run(scenario)


def test_cancel_while_decoding() -> None:
    async def scenario() -> None:
        c = await fake_cluster()
        decode = c.decodes[0]
        gen = c.router.generate("a", list(range(10)), SamplingParams(max_tokens=500))
        got = 0
        async for delta in gen:
            got += len(delta.token_ids)
            if got >= 3:
                break
        decode.stepping.clear()  # from here only the abort can free it
        assert c.router.phase("a") is Phase.DECODE and decode.held() == {1}
        await gen.aclose()
        assert c.router.phase("a") is None
        assert _aborts(decode) == [("abort", 1, False)]
        assert_all_free(decode)

    run(scenario)


def test_cancel_at_the_first_token() -> None:
    async def scenario() -> None:
        c = await fake_cluster()
        decode = c.decodes[0]
        decode.stepping.clear()
        gen = c.router.generate("a", list(range(10)), SamplingParams(max_tokens=500))
        first = await gen.__anext__()
        assert len(first.token_ids) == 1
        await gen.aclose()
        assert _aborts(decode) == [("abort", 1, False)]
        assert_all_free(decode)

    run(scenario)


def test_cancel_colocated_while_decoding() -> None:
    async def scenario() -> None:
        c = await fake_cluster(prefill=0)
        decode = c.decodes[0]
        tokens: list[int] = []
        task = asyncio.ensure_future(consume(c.router, "a", 10, 500, tokens))
        await until(lambda: len(tokens) >= 3, "decoding")
        decode.stepping.clear()
        await _cancel(task)
        assert _aborts(decode) == [("abort", 1, False)]
        assert_all_free(decode)

    run(scenario)
