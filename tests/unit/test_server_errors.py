"""The HTTP server's answers to what it will not serve: a missing key (401), an unknown model
(404), bad fields and bodies (400), oversized bodies (413), a full queue (429), a failed request
(500 or an in-band error event), each in OpenAI's error format."""

from __future__ import annotations

import json
from typing import Any

import pytest
from _scripted_frontend import ScriptedFrontend, sse_events
from _server_helpers import (  # noqa: F401
    CHAT,
    COMPLETION,
    MODEL,
    client_fixture,
    frontend_fixture,
    serve,
    tokenizer_fixture,
)
from fastapi import APIRouter
from fastapi.testclient import TestClient

from pdserve.cluster.serving.server import create_app
from pdserve.engine.deploy_config import ServerSettings


def test_api_key_guards_every_route_but_health(frontend: ScriptedFrontend) -> None:
    native = APIRouter()

    @native.get("/native/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    settings = ServerSettings(served_model_name=MODEL, api_key="sekrit")
    with TestClient(create_app(frontend, settings, extra_routers=[native])) as c:
        for path in ("/v1/models", "/metrics", "/status", "/native/ping"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert c.post("/v1/completions", json=COMPLETION).status_code == 401
        assert c.get("/health").status_code == 200
    assert frontend.calls == []
    with serve(frontend) as open_client:  # no key configured: no header needed
        assert open_client.get("/v1/models").status_code == 200


def test_unknown_model_is_404(client: TestClient, frontend: ScriptedFrontend) -> None:
    r = client.post("/v1/completions", json={**COMPLETION, "model": "gpt-4"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert "gpt-4" in error["message"] and error["code"] == "model_not_found"
    assert frontend.calls == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"n": 2}, "n"),
        ({"echo": True}, "echo"),
        ({"stop": [""]}, "stop"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [1, True]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
    ],
)
def test_bad_fields_are_400_naming_the_field(
    client: TestClient, frontend: ScriptedFrontend, change: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/completions", json={**COMPLETION, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in error["message"] and error["type"] == "invalid_request_error"
    assert frontend.calls == []


def test_malformed_bodies_and_bad_chats_are_400(client: TestClient) -> None:
    r = client.post(
        "/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json=[1, 2]).status_code == 400
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    r = client.post(
        "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": image}]}
    )
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": "word " * 200, "stream": True})
    assert r.status_code == 400 and "shorten" in r.json()["error"]["message"]  # not a broken stream


def test_bodies_over_the_limit_are_413_declared_or_streamed(frontend: ScriptedFrontend) -> None:
    big = json.dumps({**COMPLETION, "prompt": "x" * 2000}).encode()
    with serve(frontend, max_request_bytes=1000) as c:
        r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]
        chunked = (big[i : i + 100] for i in range(0, len(big), 100))  # no Content-Length
        r = c.post("/v1/completions", content=chunked, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(frontend.calls) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_full_queue_is_429_with_retry_after(frontend: ScriptedFrontend, stream: bool) -> None:
    frontend.queue_full = True
    with serve(frontend) as c:
        r = c.post("/v1/completions", json={**COMPLETION, "stream": stream})
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_failed_request_is_500_or_an_error_event(frontend: ScriptedFrontend) -> None:
    frontend.fail_at = 1
    with serve(frontend) as c:
        r = c.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 500 and "decode replica died" in r.json()["error"]["message"]
        events = sse_events(c.post("/v1/chat/completions", json={**CHAT, "stream": True}).text)
        assert events[-1] == "[DONE]"
        assert "decode replica died" in events[-2]["error"]["message"]
        assert c.get("/health").status_code == 200
