"""Recovery on the router over fake workers: a decode replica dying mid-stream migrates its
requests by token replay (no token repeated or skipped), a dead prefill instance's prompts move
to a live one, and each has its limit. The fake decode's made-up token is its output's index, so
any repeat or gap shows in the token list; every surviving replica ends with all blocks free."""

from __future__ import annotations

import asyncio

import pytest
from _fake_cluster import FakeCluster, assert_all_free, consume, fake_cluster, run, until
from _fake_decode import FIRST_TOKEN

from pdserve.engine.deploy_config import RouterSettings
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.errors import WorkerDied
from pdserve.router.router import RequestTrace

MAX_TOKENS = 10
FAULT_FREE = [FIRST_TOKEN, *range(1, MAX_TOKENS)]  # what the fakes generate undisturbed


async def kill_after(c: FakeCluster, d: int, n: int, trace: RequestTrace) -> list[int]:
    """One request's tokens; replica ``d`` dies once ``n`` of them have been read."""
    tokens: list[int] = []
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    async for delta in c.router.generate("a", list(range(10)), params, trace):
        assert delta.error is None, delta.error
        tokens += delta.token_ids
        if len(tokens) >= n and not c.decodes[d].dead:
            c.decodes[d].die()
    return tokens


@pytest.mark.parametrize("after", [1, 4])
def test_a_replica_dying_mid_stream_migrates_its_request_by_token_replay(after: int) -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=2)
        c.decodes[1].reserving.clear()  # the request starts on replica 0
        c.decodes[0].stepping.clear()
        trace = RequestTrace()
        task = asyncio.ensure_future(kill_after(c, 0, after, trace))
        await until(lambda: bool(c.decodes[0].held()), "reserved on replica 0")
        c.decodes[1].reserving.set()
        c.decodes[0].stepping.set()
        tokens = await task
        assert tokens == FAULT_FREE  # nothing repeated, nothing skipped
        assert (trace.migrations, trace.decode_instance) == (1, 1)
        assert c.router.migrations == 1 and c.router.dead_instances["decode"] == [0]
        replay = c.prefills[0].items[-1]  # the prompt plus what was streamed, as outputs
        streamed = len(replay.prompt_token_ids) - 10
        assert streamed >= after and replay.num_replayed == streamed
        assert replay.prompt_token_ids == (*range(10), *FAULT_FREE[:streamed])
        assert_all_free(c.decodes[1])

    run(scenario)


def test_colocated_replica_dying_mid_stream_replays_on_another() -> None:
    async def scenario() -> None:
        c = await fake_cluster(prefill=0, decode=2)
        c.decodes[1].reserving.clear()
        task = asyncio.ensure_future(kill_after(c, 0, 3, RequestTrace()))
        await until(lambda: bool(c.decodes[0].held()), "reserved on replica 0")
        c.decodes[1].reserving.set()
        tokens = await task
        assert tokens == FAULT_FREE
        replay = [call for call in c.decodes[1].calls if call[0] == "reserve"]
        assert len(replay) == 1
        assert_all_free(c.decodes[1])

    run(scenario)


def test_past_max_migrations_the_request_fails_naming_the_knob() -> None:
    async def scenario() -> None:
        c = await fake_cluster(decode=2, router=RouterSettings(max_migrations=0))
        c.decodes[1].reserving.clear()
        task = asyncio.ensure_future(kill_after(c, 0, 2, RequestTrace()))
        await until(lambda: bool(c.decodes[0].held()), "reserved on replica 0")
        c.decodes[1].reserving.set()
        with pytest.raises(WorkerDied, match=r"decode instance 0 died: .*router\.max_migrations"):
            await task
        assert c.router.migrations == 0
        assert_all_free(c.decodes[1])

    run(scenario)


def test_queued_prompts_of_a_dead_prefill_instance_move_to_a_live_one() -> None:
    async def scenario() -> None:
        c = await fake_cluster(prefill=2, decode=1, num_blocks=32)
        p0, p1 = c.prefills
        p0.running.clear()  # everything sent to instance 0 waits in its queue
        p1.running.clear()
        tasks = [asyncio.ensure_future(consume(c.router, f"r{i}", 6, 3)) for i in range(4)]
        await until(lambda: len(p0.queue) + len(p1.queue) == 4, "every prompt queued")
        moved = len(p0.queue)
        assert moved >= 1
        p0.die()
        p1.running.set()
        outs = await asyncio.gather(*tasks)
        assert all(len(out) == 3 for out in outs)
        assert c.router.prefill_retries == moved and c.router.dead_instances["prefill"] == [0]
        assert len(p1.items) == 4  # its own and the ones moved
        assert_all_free(c.decodes[0])
        # the dead instance's links are closed on the decode side (it cannot close them)
        listened = [call[1] for call in c.decodes[0].calls if call[0] == "listen"]
        dead = tuple(n for n in listened if "/p0r" in n)
        assert dead and all("/p1r" in n for n in listened if n not in dead)
        await until(lambda: ("close_links", dead) in c.decodes[0].calls, "dead links closed")

    run(scenario)


def test_past_max_prefill_retries_the_request_fails_naming_the_knob() -> None:
    async def scenario() -> None:
        c = await fake_cluster(prefill=2, router=RouterSettings(max_prefill_retries=0))
        c.prefills[0].die()
        c.prefills[1].die()
        with pytest.raises(WorkerDied, match=r"router\.max_prefill_retries"):
            await consume(c.router, "a", 6, 3)
        assert_all_free(c.decodes[0])

    run(scenario)
