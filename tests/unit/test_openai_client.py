"""Over a real uvicorn server: the official ``openai`` package works, and leaving clients abort."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn
from _scripted_frontend import ScriptedFrontend

from pdserve.cluster.serving.server import create_app
from pdserve.engine.deploy_config import ServerSettings
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.engine.tokenizer import load_tokenizer

MODEL = "tiny"
KEY = "sekrit"


@pytest.fixture(scope="module")
def frontend(tmp_path_factory: pytest.TempPathFactory) -> ScriptedFrontend:
    tokenizer = load_tokenizer(str(make_tiny_model(tmp_path_factory.mktemp("t") / "llama")))
    return ScriptedFrontend(tokenizer)


@pytest.fixture(scope="module")
def base_url(frontend: ScriptedFrontend) -> Iterator[str]:
    app = create_app(frontend, ServerSettings(served_model_name=MODEL, api_key=KEY))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from bind to serve: no race
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=10)


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert reply.choices[0].text == "Hello world!" and reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3


def test_completions_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Hello", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world!"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


def test_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=1
    )
    message = reply.choices[0].message
    assert message.role == "assistant" and message.content == "Hello world!"
    assert (
        reply.choices[0].logprobs is not None and len(reply.choices[0].logprobs.content or []) == 3
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world!"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 3


def test_models_and_errors_map_to_the_clients_exceptions(
    client: openai.OpenAI, base_url: str
) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.completions.create(model="gpt-4", prompt="Hi")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="Hi", temperature=-1)
    stranger = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_aborts_its_request(
    frontend: ScriptedFrontend, base_url: str, stream: bool
) -> None:
    frontend.hang_at = 1
    try:
        body = {"model": MODEL, "prompt": "Hi", "stream": stream}
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(timeout=2) as http:
            if stream:
                with http.stream(
                    "POST", f"{base_url}/completions", json=body, headers=headers
                ) as r:
                    assert "Hello" in next(r.iter_text())  # then close mid-stream
            else:
                with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
                    http.post(f"{base_url}/completions", json=body, headers=headers, timeout=0.5)
        rid = frontend.calls[-1].request_id
        deadline = time.monotonic() + 5
        while rid not in frontend.aborted:
            assert time.monotonic() < deadline, "the request was not aborted"
            time.sleep(0.01)
    finally:
        frontend.hang_at = None
