"""Self-healing pools on a real deployment (tiny llama, 1 prefill + 2 decode on CPU, decode
routed round robin): a killed decode replica, then a killed prefill instance, is replaced under
its index within the backoff; the replacement serves (the same greedy text as before the kill),
status and /metrics count the deaths and restarts, and every live replica passes its block
check. And a stranger on a KV link's store is refused while the deployment keeps serving."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import torch.distributed as dist
from cluster_helpers import deploy_spec
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.spec import load_spec
from pdserve.cluster.launch.controller import launch
from pdserve.kv_transfer.auth import GroupAuth, PeerRefused, handshake

pytestmark = pytest.mark.integration

HEALED_WITHIN_S = 25.0  # backoff 0.2 s + a health check every 0.3 s + a tiny model's start
PROMPT = "the quick brown fox jumps over"


@pytest.fixture(scope="module")
def served(ray_session: None, tiny_dirs: dict[str, Path]) -> Iterator[tuple[Any, str, str]]:
    spec = deploy_spec(
        "deploy/local.yaml",
        "itest-heal",
        tiny_dirs["llama"],
        decode={"instances": 2},
        router={"decode_policy": "round_robin", "restart_backoff_s": 0.2, "health_check_s": 0.3},
    )
    spec["model"]["dtype"] = "float32"
    actor, url = launch(resolve(load_spec(spec), gpus_available=False), detached=False)
    reference = _complete(url)
    yield actor, url, reference
    ray.get(actor.shutdown.remote(), timeout=120)
    ray.kill(actor)


def _complete(url: str) -> str:
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["text"])


def _metric(url: str, name: str, pool: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels.get("pool") == pool
    )


def _healed(actor: Any, pool: str, restarts: int) -> dict[str, Any]:
    """The status once ``pool`` counts ``restarts`` and every instance is up (bounded)."""
    deadline = time.monotonic() + HEALED_WITHIN_S
    while True:
        status = ray.get(actor.status.remote(), timeout=30)
        states = [row["state"] for row in status["prefill"] + status["decode"]]
        if status["recovery"]["restarts"][pool] == restarts and set(states) == {"up"}:
            return status  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"{pool} not healed: {status}"
        time.sleep(0.2)


def _idle(actor: Any) -> None:
    deadline = time.monotonic() + 20
    while (held := ray.get(actor.check_integrity.remote(), timeout=30)) != 0:
        assert time.monotonic() < deadline, f"{held} requests still hold KV blocks"
        time.sleep(0.1)


def test_a_killed_decode_replica_is_replaced_and_serves(served: tuple[Any, str, str]) -> None:
    actor, url, reference = served
    old = ray.get(actor.debug_handles.remote())["decode"][0]
    ray.kill(old, no_restart=True)
    status = _healed(actor, "decode", 1)
    assert status["recovery"]["deaths"]["decode"] == 1
    assert [row["restarts"] for row in status["decode"]] == [1, 0]
    fresh = ray.get(actor.debug_handles.remote())["decode"][0]
    assert fresh._actor_id != old._actor_id
    # round robin: of two requests one lands on the fresh replica (a new link to it)
    assert [_complete(url), _complete(url)] == [reference, reference]
    assert ray.get(fresh.stats.remote(), timeout=30).links
    assert _metric(url, "pdserve:worker_deaths_total", "decode") == 1
    assert _metric(url, "pdserve:worker_restarts_total", "decode") == 1
    _idle(actor)


def test_a_killed_prefill_instance_is_replaced_and_serves(served: tuple[Any, str, str]) -> None:
    actor, url, reference = served
    leader = ray.get(actor.debug_handles.remote())["prefill"][0]
    ray.kill(leader, no_restart=True)
    status = _healed(actor, "prefill", 1)
    assert status["recovery"]["deaths"]["prefill"] == 1
    assert status["prefill"][0]["restarts"] == 1
    assert _complete(url) == reference  # the only prefill instance is the fresh one
    assert _metric(url, "pdserve:worker_deaths_total", "prefill") == 1
    assert _metric(url, "pdserve:worker_restarts_total", "prefill") == 1
    _idle(actor)


def test_a_stranger_on_a_link_store_is_refused_and_serving_goes_on(
    served: tuple[Any, str, str],
) -> None:
    actor, url, reference = served
    decode = ray.get(actor.debug_handles.remote())["decode"][1]
    host, port = ray.get(decode.listen.remote("stranger-link"), timeout=30)
    store = dist.TCPStore(host, port, 2, False, datetime.timedelta(seconds=10))
    with pytest.raises(PeerRefused, match="refused this peer"):
        handshake(store, GroupAuth(b"not the deployment's secret", False), "stranger-link", 10)
    assert _complete(url) == reference
    _idle(actor)
