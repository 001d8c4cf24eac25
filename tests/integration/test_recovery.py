"""Recovery through the real cluster: a decode replica killed mid-stream (its requests migrate by
token replay and finish exactly as a fault-free run), a prefill instance killed under load (its
queued prompts move to the live one), and a prefill TP rank killed mid-prefill (the decode
replica receiving its KV survives with no block leaked). Processes die by SIGKILL, so their
sockets close at once as in a crash."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray

from pdserve.cluster import LLM, SamplingParams
from pdserve.router.errors import NoCapacityError, WorkerDied

pytestmark = pytest.mark.integration

PROMPTS = [[(7 * i + 3 * j) % 200 + 3 for j in range(20 + 9 * i)] for i in range(8)]


def _pid(actor: Any) -> int:
    return int(ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30))


def _killer(pid: int) -> Callable[[], None]:
    return lambda: os.kill(pid, signal.SIGKILL)


def _run(
    llm: LLM, params: list[SamplingParams], kill: Callable[[], None] | None, after: int
) -> list[list[int] | str]:
    """Stream every prompt at once; ``kill()`` once some stream has ``after`` tokens. Each
    result: the tokens, or the error's text."""

    async def all_streams() -> list[list[int] | str]:
        done = {"killed": kill is None}

        async def one(i: int) -> list[int] | str:
            tokens: list[int] = []
            try:
                async for delta in llm.frontend.stream(PROMPTS[i], params[i]):
                    tokens += delta.token_ids
                    if not done["killed"] and len(tokens) >= after:
                        done["killed"] = True
                        assert kill is not None
                        kill()
            except (WorkerDied, NoCapacityError) as e:
                return str(e)
            return tokens

        return list(await asyncio.gather(*(one(i) for i in range(len(PROMPTS)))))

    return llm._loop.run(asyncio.wait_for(all_streams(), 120))


def _greedy() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)] * len(PROMPTS)


def _mixed() -> list[SamplingParams]:
    """Greedy for even prompts; seeded sampling with penalties for odd ones."""
    sampled = dict(temperature=0.9, top_k=50, repetition_penalty=1.3, presence_penalty=0.5)
    seeded = [
        SamplingParams(max_tokens=40, seed=100 + i, ignore_eos=True, **sampled)  # type: ignore[arg-type]
        for i in range(len(PROMPTS))
    ]
    return [g if i % 2 == 0 else seeded[i] for i, g in enumerate(_greedy())]


def _integrity(actor: Any) -> int:
    return int(ray.get(actor.check_integrity.remote(), timeout=30))


def test_a_decode_replica_killed_mid_stream_migrates_every_request(
    ray_session: None, tiny_dirs: dict[str, Path]
) -> None:
    """Greedy and seeded (with penalties) streams end exactly as without the fault: nothing
    repeated or skipped, the seeded draws and penalties carried over."""
    with LLM(str(tiny_dirs["llama"]), decode_instances=2, dtype="float32") as llm:
        reference = _run(llm, _mixed(), None, 0)
        outs = _run(llm, _mixed(), _killer(_pid(llm.deployment.decode[0])), 10)
        assert outs == reference
        router = llm.deployment.router
        assert router.migrations > 0 and router.dead_instances["decode"] == [0]
        assert _integrity(llm.deployment.decode[1]) == 0


def test_a_prefill_instance_killed_under_load_moves_its_prompts(
    ray_session: None, tiny_dirs: dict[str, Path]
) -> None:
    with LLM(str(tiny_dirs["llama"]), prefill_instances=2, dtype="float32") as llm:
        reference = _run(llm, _greedy(), None, 0)
        leader = llm.deployment.prefill[0].leader
        outs = _run(llm, _greedy(), _killer(_pid(leader)), 1)
        assert outs == reference
        # the kill may land after every prompt was prefilled: the next ones find it dead
        assert _run(llm, _greedy(), None, 0) == reference
        assert llm.deployment.router.dead_instances["prefill"] == [0]
        assert llm.check_integrity() == 0


def test_a_prefill_tp_rank_killed_mid_prefill_never_takes_decode_down(
    ray_session: None, tiny_dirs: dict[str, Path]
) -> None:
    """Rank 1 of a TP 2 instance dies while its batches send KV: the instance is taken out and
    its leader killed; the decode replica stays alive and holds no block; requests end with a
    clear error (no instance is left) or complete."""
    with LLM(str(tiny_dirs["llama"]), prefill_tensor_parallel_size=2, dtype="float32") as llm:
        group = llm.deployment.prefill[0]
        outs = _run(llm, _greedy(), _killer(_pid(group.ranks[1])), 1)
        assert all(isinstance(o, list) or "prefill" in o for o in outs), outs
        assert any(isinstance(o, str) for o in outs)  # the kill landed mid-work
        decode = llm.deployment.decode[0]
        deadline = time.monotonic() + 30
        while _integrity(decode) != 0:  # aborts of KV in flight land asynchronously
            assert time.monotonic() < deadline, "decode still holds requests"
            time.sleep(0.1)
        assert ray.get(decode.get_load.remote(), timeout=30).free_blocks > 0  # alive
        with pytest.raises(ray.exceptions.RayActorError):  # the leader was cleaned up
            ray.get(group.leader.ready.remote(), timeout=30)


def test_a_reservation_left_by_a_dead_router_expires_after_its_lease(
    ray_session: None, tiny_dirs: dict[str, Path]
) -> None:
    """Blocks reserved by a router that died before dispatching the prefill are freed after
    decode.kv_lease_s and counted; the replica serves on."""
    from pdserve.engine.request import DecodeRequest

    with LLM(str(tiny_dirs["llama"]), kv_lease_s=1.0) as llm:
        decode = llm.deployment.decode[0]
        orphan = DecodeRequest(10**9, "orphan", tuple(range(3, 40)), _greedy()[0])
        blocks, _ = ray.get(decode.reserve.remote(orphan), timeout=30)
        assert blocks is not None and _integrity(decode) == 1
        deadline = time.monotonic() + 15
        while _integrity(decode) != 0:
            assert time.monotonic() < deadline, "the orphan reservation never expired"
            time.sleep(0.1)
        stats = ray.get(decode.stats.remote(), timeout=30)
        assert stats.leases_expired == 1 and stats.load.free_blocks == stats.load.total_blocks
        assert llm.generate("after", _greedy()[0])[0].finish_reason == "length"
