"""The Ray adapters behind the router's ports, over stand-in actor handles (no Ray cluster):
Ray's actor-death errors become WorkerDied, a KVLinkError from a prefill actor arrives plain,
and the decode stream is sent at once and read as StepDeltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from pdserve.cluster.launch.ray_ports import RayDecodePort, RayPrefillPort
from pdserve.engine.request import PrefillItem, StepDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.errors import KVLinkError
from pdserve.router.errors import WorkerDied


class _Method:
    def __init__(self, fn: Callable[..., Any], log: list[str], name: str) -> None:
        self.fn, self.log, self.name = fn, log, name

    def remote(self, *args: Any) -> Any:
        self.log.append(self.name)
        return self.fn(*args)


class _Handle:
    """Stands in for an actor handle: ``handle.method.remote(...)`` calls ``fn``."""

    def __init__(self, **methods: Callable[..., Any]) -> None:
        self.log: list[str] = []
        for name, fn in methods.items():
            setattr(self, name, _Method(fn, self.log, name))


def _raises(error: BaseException) -> Callable[..., Awaitable[Any]]:
    async def call(*_: Any) -> Any:
        raise error

    return call


async def _ready(value: Any) -> Any:
    return value


class _Refs:
    """Ray's streaming generator: ObjectRefs to await, or an error at some read."""

    def __init__(self, *items: Any) -> None:
        self.items = list(items)

    def __aiter__(self) -> AsyncIterator[Awaitable[Any]]:
        return self

    async def __anext__(self) -> Awaitable[Any]:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return _ready(item)


ITEM = PrefillItem(1, "r", (1, 2, 3), SamplingParams(), 1, (0,))


@pytest.mark.parametrize("error", [ActorDiedError(), ActorUnavailableError("gone", None)])
def test_actor_death_is_worker_died_naming_the_worker(error: Exception) -> None:
    decode = RayDecodePort(_Handle(get_load=_raises(error), listen=_raises(error)), 3)
    prefill = RayPrefillPort(_Handle(prefill=_raises(error), abort=_raises(error)), 2, 0)

    async def scenario() -> None:
        with pytest.raises(WorkerDied, match="decode instance 3") as died:
            await decode.load()
        assert (died.value.role, died.value.instance) == ("decode", 3)
        with pytest.raises(WorkerDied, match="decode instance 3"):
            await decode.listen("link")
        with pytest.raises(WorkerDied, match="prefill instance 2 rank 0"):
            await prefill.prefill(ITEM)
        with pytest.raises(WorkerDied, match="prefill instance 2 rank 0"):
            await prefill.abort(1)

    asyncio.run(scenario())


def test_a_dead_tp_peer_reported_by_the_leader_is_the_instance_dying() -> None:
    peer_died = RayTaskError("execute", "traceback", ActorDiedError()).as_instanceof_cause()
    prefill = RayPrefillPort(_Handle(prefill=_raises(peer_died)), 0, 0)
    with pytest.raises(WorkerDied, match="prefill instance 0"):
        asyncio.run(prefill.prefill(ITEM))


def test_kv_link_error_from_the_prefill_actor_arrives_plain() -> None:
    wrapped = RayTaskError("prefill", "traceback", KVLinkError(1, "link d1 broke"))
    prefill = RayPrefillPort(_Handle(prefill=_raises(wrapped.as_instanceof_cause())), 0, 0)
    with pytest.raises(KVLinkError) as caught:
        asyncio.run(prefill.prefill(ITEM))
    assert type(caught.value) is KVLinkError
    assert (caught.value.decode_instance, str(caught.value)) == (1, "link d1 broke")


def test_other_errors_pass_through() -> None:
    prefill = RayPrefillPort(_Handle(prefill=_raises(ValueError("bad batch"))), 0, 0)
    with pytest.raises(ValueError, match="bad batch"):
        asyncio.run(prefill.prefill(ITEM))


def test_stream_is_sent_at_once_and_a_death_mid_stream_is_worker_died() -> None:
    refs = _Refs(StepDelta([5]), ActorDiedError())
    handle = _Handle(stream=lambda tid: refs)
    decode = RayDecodePort(handle, 1)

    async def scenario() -> None:
        stream = decode.stream(7)
        assert handle.log == ["stream"]  # before the first read
        assert (await stream.__anext__()).token_ids == [5]
        with pytest.raises(WorkerDied, match="decode instance 1"):
            await stream.__anext__()

    asyncio.run(scenario())


def test_calls_return_what_the_actor_returns() -> None:
    handle = _Handle(listen=lambda name: _ready(("10.0.0.1", 4242)), abort=lambda t, p: _ready(p))
    decode = RayDecodePort(handle, 0)

    async def scenario() -> None:
        assert await decode.listen("l") == ("10.0.0.1", 4242)
        assert await decode.abort(1, True) is True

    asyncio.run(scenario())
