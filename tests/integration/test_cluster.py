"""The deployed cluster: a controller started from deploy/local-tp3.yaml's shape at TP=2 (TP=2 prefill, 2 decode
replicas) serving HTTP, used through curl-like requests, the client library and the openai package."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import ray
from cluster_helpers import NEW_TOKENS, deploy_spec, hf_greedy, parity_prompts

from pdserve.cluster import Client
from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.spec import load_spec
from pdserve.cluster.launch.controller import launch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(ray_session: None, tiny_dirs: dict[str, Path]) -> Iterator[tuple[Any, str]]:
    spec = deploy_spec(
        "deploy/local-tp3.yaml",
        "itest-tp2",
        tiny_dirs["llama"],
        prefill={"tensor_parallel_size": 2},
    )
    actor, url = launch(resolve(load_spec(spec), gpus_available=False), detached=False)
    yield actor, url
    ray.get(actor.shutdown.remote(), timeout=120)
    ray.kill(actor)


def assert_idle(actor: Any, timeout: float = 20.0) -> None:
    """Every decode replica passes check_integrity and holds no request (aborts land async)."""
    deadline = time.monotonic() + timeout
    while (held := ray.get(actor.check_integrity.remote())) != 0:
        assert time.monotonic() < deadline, f"{held} requests still hold KV blocks"
        time.sleep(0.05)


def _finished_requests(url: str) -> float:
    """pdserve:request_success_total over every finish reason, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pdserve:request_success_total"
    )


def test_parity_over_http_and_client_across_both_replicas(
    served: tuple[Any, str], tiny_dirs: dict[str, Path]
) -> None:
    actor, url = served
    model = tiny_dirs["llama"]
    tok_count = 700
    prompts = parity_prompts(tok_count)
    expected = hf_greedy(model, prompts, NEW_TOKENS)
    before = _finished_requests(url)
    with Client(url) as client:  # the native msgpack API
        for prompt, ref in zip(prompts, expected):
            out = client.generate(prompt, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
            assert out["token_ids"] == ref
    assert _finished_requests(url) - before == len(prompts)
    texts = [client_text for client_text in _http_texts(url, prompts)]
    with Client(url) as client:
        refs = [
            client.generate(p, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)["text"]
            for p in prompts
        ]
    assert texts == refs
    status = ray.get(actor.status.remote())
    assert [d["links"] > 0 for d in status["decode"]] == [True, True]  # both replicas served
    # the spec's kv_transfer.backend
    assert [d["kv_backends"] for d in status["decode"]] == ["gloo", "gloo"]
    assert_idle(actor)


def _http_texts(url: str, prompts: list[list[int]]) -> list[str]:
    body = {"model": "tiny-llama", "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    out = []
    for prompt in prompts:
        r = httpx.post(f"{url}/v1/completions", json=body | {"prompt": prompt}, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        out.append(choice["text"])
    return out


def test_openai_package_against_the_server(served: tuple[Any, str]) -> None:
    actor, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    done = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
    assert done.usage is not None and done.usage.completion_tokens == 5
    chunks = list(
        client.completions.create(
            model=model,
            prompt="Hello",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    chat = client.chat.completions.create(
        model=model, max_tokens=4, temperature=0, messages=[{"role": "user", "content": "Hi"}]
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage is not None
    stream = client.chat.completions.create(
        model=model,
        max_tokens=4,
        temperature=0,
        stream=True,
        messages=[{"role": "user", "content": "Hi"}],
        stream_options={"include_usage": True},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model, prompt="x", max_tokens=0)
    assert_idle(actor)


def test_batch_job_of_200_survives_client_disconnect(
    served: tuple[Any, str], tmp_path: Path
) -> None:
    actor, url = served
    prompts = [f"job prompt {i}" for i in range(200)]
    before = _finished_requests(url)
    with Client(url) as first:
        job = first.submit_job(prompts, max_tokens=4, temperature=0.0, ignore_eos=True)
    # the first client is gone mid-job; a new one comes back for the results
    with Client(url) as second:
        info = second.job(job.id).wait()
        assert info["state"] == "completed" and info["completed"] == 200
        results = second.job(job.id).results()
    assert [r["index"] for r in results] == list(range(200))
    assert _finished_requests(url) - before >= 200  # jobs count in /metrics like any request
    assert [r["prompt"] for r in results] == prompts
    assert all(len(r["token_ids"]) == 4 and not r.get("error") for r in results)
    assert_idle(actor)


@pytest.mark.parametrize("when", ["before first token", "mid decode"])
def test_client_disconnect_frees_blocks(served: tuple[Any, str], when: str) -> None:
    actor, url = served
    body = {
        "model": "tiny-llama",
        "prompt": "disconnect " * 50,
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }

    async def go() -> None:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("POST", f"{url}/v1/completions", json=body) as r,
        ):
            assert r.status_code == 200
            if when == "mid decode":
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break

    asyncio.run(go())
    assert_idle(actor)


def test_two_deployments_share_a_ray_cluster(
    served: tuple[Any, str], tiny_dirs: dict[str, Path]
) -> None:
    """A second deployment (deploy/local.yaml's shape) beside the first: its own namespace,
    port and KV links; both answer, neither sees the other's workers."""
    first, first_url = served
    spec = deploy_spec("deploy/local.yaml", "itest-second", tiny_dirs["llama"])
    second, second_url = launch(resolve(load_spec(spec), gpus_available=False), detached=False)
    try:
        assert second_url != first_url
        body = {
            "model": "tiny-llama",
            "prompt": [5, 6, 7],
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
        }
        texts = [
            httpx.post(f"{u}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            for u in (first_url, second_url)
        ]
        assert texts[0] == texts[1]  # same model, same greedy text, different clusters of actors
        a, b = ray.get([first.status.remote(), second.status.remote()])
        assert a["namespace"] != b["namespace"]
        assert (len(a["decode"]), len(b["decode"])) == (2, 1)
        assert ray.get(second.check_integrity.remote()) == 0
    finally:
        ray.get(second.shutdown.remote(), timeout=120)
        ray.kill(second)
    assert_idle(first)


def test_a_deployment_the_cluster_cannot_place_fails_in_time_and_holds_nothing(
    served: tuple[Any, str], tiny_dirs: dict[str, Path]
) -> None:
    """Ray keeps a worker that asks for what no node has pending forever; the start gives up
    after ray.start_timeout_s naming what waits and why, kills what it started, and the
    deployment beside it serves on."""
    first, _ = served
    free = ray.available_resources().get("CPU", 0)
    spec = deploy_spec(
        "deploy/local.yaml",
        "itest-unplaceable",
        tiny_dirs["llama"],
        decode={"resources": {"pdserve-absent": 1}},
        ray={"start_timeout_s": 8},
    )
    with pytest.raises(Exception, match=r"did not start within 8 s") as info:
        launch(resolve(load_spec(spec), gpus_available=False), detached=False)
    text = str(info.value)
    assert "decode replica(s) 0 not running" in text
    assert "the cluster has no pdserve-absent at all" in text
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < free:  # killed actors hand slots back
        assert time.monotonic() < deadline, "the failed start left workers holding CPU slots"
        time.sleep(0.2)
    assert not [
        pg
        for pg in ray.util.placement_group_table().values()
        if pg["name"].startswith("pdserve-itest-unplaceable") and pg["state"] != "REMOVED"
    ]
    assert_idle(first)
