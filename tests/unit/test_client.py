"""The client library and CLI verbs against the native API served by uvicorn on a fake frontend."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import msgpack
import pytest
import uvicorn
from _fake_jobs_frontend import FakeFrontend, expected_text

from pdserve.cluster.cli.jobs import add_jobs_args, add_submit_args, run_jobs, run_submit
from pdserve.cluster.client import Client, PdserveError, read_prompts
from pdserve.cluster.client_jobs import JobFailedError
from pdserve.cluster.serving.jobs import JobManager
from pdserve.cluster.serving.native_api import MSGPACK, PREFIX, NativeApi
from pdserve.cluster.serving.server import create_app
from pdserve.engine.deploy_config import ServerSettings
from pdserve.engine.tokenizer import apply_chat_template, load_tokenizer

KEY = "test-key"
BODY_LIMIT = 64 << 10


@dataclass
class Served:
    url: str
    frontend: FakeFrontend
    api: NativeApi


def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[Served]:
    fe = FakeFrontend(jitter_s=0.002)
    fe.tokenizer = load_tokenizer(str(tiny_models["llama"]))  # its chat template renders chats
    api = NativeApi(fe, JobManager(fe, tmp_path_factory.mktemp("jobs"), max_concurrency=16))
    settings = ServerSettings(api_key=KEY, max_request_bytes=BODY_LIMIT)
    app = create_app(cast(Any, fe), settings, extra_routers=[api.router])
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Served(f"http://127.0.0.1:{port}", fe, api)
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    served.frontend.release.clear()
    with Client(served.url, api_key=KEY) as c:
        yield c


def test_generate_and_stream_give_the_same_completion(client: Client) -> None:
    out = client.generate("hello world", max_tokens=8)
    assert (out["text"], out["finish_reason"]) == ("HELLO WO", "length")
    assert out["token_ids"] == [ord(c) for c in "HELLO WO"] and out["metrics"]["e2e"] > 0
    deltas = list(client.stream("hello world", max_tokens=8))
    assert len(deltas) == 8 and "".join(d["text"] for d in deltas) == out["text"]
    assert [d["finish_reason"] for d in deltas] == [None] * 7 + ["length"]
    assert deltas[-1]["metrics"]["num_output_tokens"] == 8
    assert client.generate([7, 8, 9], max_tokens=8)["text"] == "HIJ"


def test_cancel_ends_a_stream_and_a_generate_and_aborts_them(
    client: Client, served: Served
) -> None:
    stream = client.stream("slow " * 8, request_id="s1", max_tokens=40)
    first = next(stream)
    assert first["request_id"] == "s1" and client.cancel("s1") is True
    assert list(stream)[-1]["finish_reason"] == "cancelled"
    got: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: got.update(client.generate("slow", request_id="g1")))
    thread.start()
    until(lambda: "g1" in served.api.runs)
    time.sleep(0.12)  # a few tokens in
    assert client.cancel("g1") is True
    thread.join(10)
    assert got["finish_reason"] == "cancelled" and got["text"] == "SLOW"[: len(got["text"])]
    assert {"s1", "g1"} <= set(served.frontend.aborted)
    assert client.cancel("s1") is False and not served.api.runs


def test_leaving_a_stream_early_aborts_the_request(client: Client, served: Served) -> None:
    stream = client.stream("slow " * 8, request_id="gone", max_tokens=40)
    next(stream)
    stream.close()  # closes the connection
    until(lambda: "gone" in served.frontend.aborted, timeout=5)
    until(lambda: not served.api.runs, timeout=5)


def test_a_jsonl_job_waits_with_progress_and_returns_results_in_order(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "prompts.jsonl"
    prompts = [f"prompt {i}" for i in range(200)]
    prompts[3] = "bad prompt"
    lines = [json.dumps({"prompt": p} if i % 2 else p) for i, p in enumerate(prompts)]
    path.write_text("\n".join(lines[:100]) + "\n\n" + "\n".join(lines[100:]) + "\n")
    job = client.submit_job(path, name="jsonl", max_tokens=4)
    info = job.wait(progress=True, poll_s=0.02)
    assert (info["state"], info["completed"], info["failed"]) == ("completed", 199, 1)
    assert "200/200" in capsys.readouterr().err  # the tqdm bar reached the end
    results = job.results()
    assert [r["index"] for r in results] == list(range(200))
    assert [r["prompt"] for r in results] == prompts
    assert results[0]["text"] == expected_text("prompt 0", 4) and "bad" in results[3]["error"]
    assert list(job.iter_results(page_size=7)) == results  # paging gives the same list
    assert job.id in [j["id"] for j in client.list_jobs()]


def test_results_survive_the_client_leaving_mid_job(served: Served) -> None:
    prompts = [f"p{i}" for i in range(30)] + [f"hold {i}" for i in range(10)]
    first = Client(served.url, api_key=KEY)
    job_id = first.submit_job(prompts, max_tokens=8).id
    until(lambda: first.job(job_id).status()["completed"] == 30)
    first.close()  # the client goes away mid-job
    served.frontend.release.set()
    with Client(served.url, api_key=KEY) as second:
        job = second.job(job_id)
        assert job.wait()["state"] == "completed"
        assert [r["text"] for r in job.results()] == [expected_text(p, 8) for p in prompts]


def test_server_errors_become_pdserve_errors_with_the_message(client: Client) -> None:
    def error(call: Callable[[], Any]) -> PdserveError:
        with pytest.raises(PdserveError) as info:
            call()
        return info.value

    e = error(lambda: client.generate("hi", temperature=-1))
    assert e.status_code == 400 and "temperature" in e.message
    e = error(lambda: client.generate("hi", temprature=0.5))
    assert e.status_code == 400 and "unknown sampling parameter" in e.message
    e = error(lambda: client.generate("hi", temperature="hot"))
    assert e.status_code == 400 and "hot" in e.message
    assert error(lambda: client.generate("bad prompt")).status_code == 400
    e = error(lambda: client.generate("full"))
    assert e.status_code == 429 and e.retry_after == 1.0
    e = error(lambda: client.generate("fail now"))
    assert e.status_code == 500 and "worker lost" in e.message
    stream = client.stream("fail now")
    assert next(stream)["text"] == "F"
    assert "worker lost" in error(lambda: next(stream)).message
    assert error(lambda: client.job("job-nope")).status_code == 404
    assert error(lambda: client.submit_job([])).status_code == 400
    assert error(lambda: client.submit_job(["x" * 1000] * 100)).status_code == 413


def test_api_key_and_connection_errors(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    with pytest.raises(PdserveError, match="PDSERVE_API_KEY") as info:
        Client(served.url).list_jobs()
    assert info.value.status_code == 401
    monkeypatch.setenv("PDSERVE_API_KEY", KEY)
    assert isinstance(Client(served.url).list_jobs(), list)
    with pytest.raises(PdserveError, match="cannot reach") as info:
        Client("http://127.0.0.1:9", timeout=2).generate("hi")
    assert info.value.status_code is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"prompt": "hi", "extra": 1}), "unknown field"),
        (msgpack.packb({"prompt": {"text": "hi"}}), "prompt must be"),
        (msgpack.packb({"prompt": [1, True]}), "prompt must be"),
        (msgpack.packb({"prompt": "hi", "sampling": [1]}), "sampling must be a map"),
        (msgpack.packb({"prompt": msgpack.ExtType(1, b"x")}), "ext type"),
        (msgpack.packb({1: "hi"}), "not valid msgpack"),
    ],
)
def test_malformed_bodies_are_400(served: Served, body: bytes, message: str) -> None:
    r = httpx.post(
        f"{served.url}{PREFIX}/generate",
        content=body,
        headers={"authorization": f"Bearer {KEY}", "content-type": MSGPACK},
    )
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_read_prompts_names_the_line_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('"a"\n{"prompt": [1, 2]}\n')
    assert read_prompts(path) == ["a", [1, 2]]
    for text, message in [
        ('"a"\n{"prompt": "b", "temperature": 0}\n', "p.jsonl:2.*whole job"),
        ("{nope\n", "p.jsonl:1: not JSON"),
        ("42\n", "p.jsonl:1: a prompt is"),
        ("\n\n", "no prompts"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_prompts(path)


def _args(add: Callable[[argparse.ArgumentParser], None], argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_cli_submit_writes_results_in_order_and_jobs_lists_them(
    served: Served,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"cli {i}"}) + "\n" for i in range(20)))
    common = ["--url", served.url, "--api-key", KEY]
    argv = [str(src), "-o", str(out), "--max-tokens", "5", "--name", "from-cli", *common]
    assert run_submit(_args(add_submit_args, argv)) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in results] == [expected_text(f"cli {i}", 5) for i in range(20)]
    capsys.readouterr()
    assert run_submit(_args(add_submit_args, [*argv[:3], "--no-wait", *common])) == 0
    job_id = capsys.readouterr().out.strip()
    assert run_jobs(_args(add_jobs_args, [job_id, "--wait", "-o", str(out), *common])) == 0
    assert len(out.read_text().splitlines()) == 20
    assert run_jobs(_args(add_jobs_args, common)) == 0
    table = capsys.readouterr().out
    assert job_id in table and "from-cli" in table and "20/20" in table
    assert run_jobs(_args(add_jobs_args, ["job-nope", *common])) == 1
    src.write_text('{"prompt": "x", "max_tokens": 3}\n')
    assert run_submit(_args(add_submit_args, [str(src), *common])) == 2


def test_chat_is_rendered_with_the_models_template_on_the_server(
    client: Client, served: Served
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = apply_chat_template(served.frontend.tokenizer, messages)
    # the fake answers with its prompt, one letter per token id
    expected = expected_text("".join(chr(65 + t % 26) for t in ids), 8)
    assert client.chat(messages, max_tokens=8)["text"] == expected
    assert "".join(d["text"] for d in client.stream_chat(messages, max_tokens=8)) == expected
    assert client.generate("Hi", max_tokens=8)["text"] == "HI"  # a prompt stays raw text
    with pytest.raises(PdserveError, match="either prompt") as info:
        client._call("POST", "/generate", {"prompt": "x", "messages": messages})
    assert info.value.status_code == 400
    with pytest.raises(PdserveError, match="messages") as info:
        client.chat([{"role": "user"}], max_tokens=4)
    assert info.value.status_code == 400


def test_a_job_with_failed_prompts_exits_non_zero_with_a_summary(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = ["ok 0", "fail here", "ok 2", "bad one"]
    src.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    argv = [str(src), "-o", str(out), "--max-tokens", "4", "--url", served.url, "--api-key", KEY]
    assert run_submit(_args(add_submit_args, argv)) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "completed: 2 ok, 2 failed; 4 results written" in said
    assert "prompt 1 failed: request" in said and "worker lost" in said
    assert "prompt 3 failed: bad prompt" in said
    assert len(out.read_text().splitlines()) == 4
    with Client(served.url, api_key=KEY) as client:
        job = client.submit_job(prompts, max_tokens=4)
        with pytest.raises(JobFailedError, match="completed: 2 ok, 2 failed") as e:
            job.wait(poll_s=0.02, timeout=20, check=True)
        assert e.value.info["failed"] == 2
        assert client.submit_job(["ok"]).wait(poll_s=0.02, check=True)["completed"] == 1
