"""The bad-input corpus (_bad_inputs.py) against one real deployment (1 prefill, 1 decode, the
tiny model): every case is a clear 4xx naming the field or the fix, and the server stays healthy;
the same for the client library, deploy and experiment YAML files and batch-job JSONL (no
server needed). Then, on the same deployment: the 429 bound is exact under a burst, and
logit_bias and min_tokens change the output as specified."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from _bad_inputs import JSON, NATIVE, OPENAI, Case
from cluster_helpers import deploy_spec, free_port

from pdserve.bench.sweep.experiment import ExperimentError
from pdserve.bench.sweep.experiment_loader import load_experiment
from pdserve.cluster import Client
from pdserve.cluster.client import PdserveError, read_prompts
from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.spec import SpecError, load_spec
from pdserve.cluster.launch.controller import launch

pytestmark = pytest.mark.integration
LIMIT = 8  # router.max_queued_requests of the deployment


@pytest.fixture(scope="module")
def served(ray_session: None, tiny_dirs: dict[str, Path]) -> Iterator[tuple[Any, str]]:
    spec = deploy_spec(
        "deploy/local.yaml", "itest-corpus", tiny_dirs["llama"],
        router={"max_queued_requests": LIMIT}, decode={"kv_cache": {"memory": "64MiB"}},
    )  # fmt: skip
    actor, url = launch(resolve(load_spec(spec), gpus_available=False), detached=False)
    yield actor, url
    ray.get(actor.shutdown.remote(), timeout=120)
    ray.kill(actor)


def _send(http: httpx.Client, case: Case) -> httpx.Response:
    if isinstance(case.body, dict):
        return http.request(case.method, case.path, content=json.dumps(case.body), headers=JSON)
    headers = case.headers or (JSON if case.body is not None else {})
    return http.request(case.method, case.path, content=case.body, headers=headers)


@pytest.mark.parametrize("case", OPENAI + NATIVE, ids=lambda k: k.id)
def test_bad_http_input_is_a_clear_error(served: tuple[Any, str], case: Case) -> None:
    with httpx.Client(base_url=served[1], timeout=60) as http:
        r = _send(http, case)
        assert r.status_code == case.status, r.text[:300]
        error = r.json()["error"]  # OpenAI's error object on every route, never {"detail"}
        assert set(error) == {"message", "type", "param", "code"}
        for word in case.words:
            assert word in error["message"], (word, error["message"][:300])
        assert http.get("/health").status_code == 200


CLIENT_CASES = [
    ("lone-surrogate", {"prompt": "\ud800"}, ValueError, "not valid Unicode"),
    ("unpackable", {"prompt": "x", "temperature": object()}, ValueError, "msgpack cannot send"),
    ("bad-key", {"prompt": "x", "temprature": 1}, PdserveError, "temprature"),
    ("nan", {"prompt": "x", "top_p": float("nan")}, PdserveError, "top_p"),
    ("bias-type", {"prompt": "x", "logit_bias": {"a": 1}}, PdserveError, "logit_bias"),
    ("empty-ids", {"prompt": []}, PdserveError, "prompt"),
]


@pytest.mark.parametrize(("id", "call", "error", "words"), CLIENT_CASES, ids=lambda x: str(x))
def test_client_library_reports_bad_input(
    served: tuple[Any, str], id: str, call: dict, error: type[Exception], words: str
) -> None:
    kwargs = dict(call)
    prompt = kwargs.pop("prompt")
    with Client(served[1]) as client:
        with pytest.raises(error, match=words):
            client.generate(prompt, max_tokens=2, **kwargs)
        assert client.generate("Hi", max_tokens=2)["finish_reason"] == "length"


def test_a_client_that_cannot_connect_says_so() -> None:
    with (
        Client("http://127.0.0.1:9", timeout=5) as client,
        pytest.raises(PdserveError, match="cannot reach pdserve"),
    ):
        client.generate("x")


YAML_CASES = [
    ("tab", "name: x\n\tmodel: y\n", "not valid YAML"),
    ("duplicate", "name: a\nname: b\n", "appears twice"),
    ("list-top", "- a\n- b\n", "top level must be a mapping"),
    ("unknown-key", "name: x\nmodle: {path: y}\n", "modle"),
    ("latin1", b"name: caf\xe9\n", "not UTF-8"),
    (
        "laughs",
        "a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
        "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
        "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
        "expand to over",
    ),
    ("negative", "name: x\ndecode: {instances: -1}\n", "decode.instances"),
]


@pytest.mark.parametrize(("id", "text", "words"), YAML_CASES, ids=lambda x: str(x)[:20])
@pytest.mark.parametrize("kind", ["deploy", "experiment"])
def test_bad_yaml_files_are_clear_errors(
    tmp_path: Path, kind: str, id: str, text: str | bytes, words: str
) -> None:
    if kind == "experiment" and id in ("unknown-key", "negative"):
        text = "name: x\nplacments: []\n" if id == "unknown-key" else "name: x\nseed: -1\n"
        words = "placments" if id == "unknown-key" else "placements: missing"
    path = tmp_path / f"{id}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    load = load_spec if kind == "deploy" else load_experiment
    with pytest.raises((SpecError, ExperimentError)) as e:
        load(path)
    assert words in str(e.value) and len(str(e.value)) < 1000


JSONL_CASES = [
    ("not-json", b"{prompt: 1}\n", ":1: not JSON"),
    ("extra-key", b'{"prompt": "a", "max_tokens": 3}\n', "sampling settings"),
    ("bad-ids", b'"ok"\n[1, -2]\n', ":2: a prompt is"),
    ("latin1", b'"ok"\n"caf\xe9"\n', ":2: not UTF-8"),
    ("empty", b"\n\n", "holds no prompts"),
]


@pytest.mark.parametrize(("id", "data", "words"), JSONL_CASES, ids=lambda x: str(x)[:12])
def test_bad_job_jsonl_is_a_clear_error(tmp_path: Path, id: str, data: bytes, words: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        read_prompts(path)


def test_the_429_bound_is_exact_under_a_burst(served: tuple[Any, str]) -> None:
    body = {"prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "temperature": 0}

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=served[1], timeout=300, limits=limits) as http:
            return await asyncio.gather(
                *(http.post("/v1/completions", json=body) for _ in range(60))
            )

    replies = asyncio.run(burst())
    codes = [r.status_code for r in replies]
    assert codes.count(200) == LIMIT and codes.count(429) == 60 - LIMIT, codes
    refused = next(r for r in replies if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    metrics = httpx.get(f"{served[1]}/metrics", timeout=10).text
    line = next(x for x in metrics.splitlines() if 'reason="queue_full"' in x)
    assert float(line.split()[-1]) >= 60 - LIMIT


def test_logit_bias_and_min_tokens_change_the_output(served: tuple[Any, str]) -> None:
    greedy: dict[str, Any] = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
    with Client(served[1]) as client:
        first = client.generate("Hello", **greedy)["token_ids"]
        banned = client.generate("Hello", **greedy, logit_bias={first[0]: -100})["token_ids"]
        assert banned[0] != first[0]
        forced = client.generate("Hello", **greedy, logit_bias={7: 100})["token_ids"]
        assert forced == [7] * 6
        stop = {"temperature": 0, "max_tokens": 6, "stop_token_ids": [first[0]]}
        assert client.generate("Hello", **stop)["token_ids"] == [first[0]]
        held = client.generate("Hello", **stop, min_tokens=3)["token_ids"]
        assert len(held) >= 3 and first[0] not in held[:3]
        eos = _eos(served)
        out = client.generate("Hello", temperature=0, max_tokens=10, min_tokens=4,
                              logit_bias={eos: 100})  # fmt: skip
        assert out["finish_reason"] == "stop" and len(out["token_ids"]) == 5
        assert eos not in out["token_ids"][:4]
    assert ray.get(served[0].check_integrity.remote()) == 0


def _eos(served: tuple[Any, str]) -> int:
    from pdserve.engine.tokenizer import load_tokenizer

    model = ray.get(served[0].status.remote())["model"]
    eos = load_tokenizer(model).eos_token_id
    assert isinstance(eos, int)
    return eos


PDSERVE = str(Path(sys.executable).parent / "pdserve")


def test_up_fails_fast_with_the_cause(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    """A taken port, a dead Ray address: `pdserve up` exits with the cause, never hangs (the
    four commands run at once: each is a separate process, and the suite's time counts)."""
    dead = f"127.0.0.1:{free_port()}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        spec = deploy_spec("deploy/local.yaml", "itest-taken", tiny_dirs["llama"])
        spec["server"]["port"] = taken.getsockname()[1]
        path = tmp_path / "taken.yaml"
        path.write_text(yaml.safe_dump(spec))
        cases = [
            (["up", "-f", str(path)], 1, "already in use"),
            (["up", "-f", str(path), "--address", dead], 2, "no Ray cluster answers"),
            (["status", "--address", dead], 1, "no Ray cluster answers"),
            (["down", "--address", dead], 1, "no Ray cluster answers"),
        ]
        runs = [
            subprocess.Popen(
                [PDSERVE, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for argv, _, _ in cases
        ]
        try:
            outputs = [run.communicate(timeout=240)[0] for run in runs]
        finally:
            for run in runs:
                run.kill()
    for (argv, code, cause), run, out in zip(cases, runs, outputs):
        assert run.returncode == code and cause in out, (argv, out[-2000:])
