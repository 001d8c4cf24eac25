"""Operations findings: the HTTP port and the Ray address fail fast with their cause, YAML is
read bounded, the admission bound is exact under a burst, failures are counted, gauges ignore a
dead replica, and a slow or silent connection is cut."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from _fake_jobs_frontend import FakeFrontend

from pdserve.cluster.config.spec import SpecError, load_spec
from pdserve.cluster.launch.ray_env import RayAddressError, check_ray_address
from pdserve.cluster.serving.admission import AdmissionGate
from pdserve.cluster.serving.http_server import ListenError, bind_socket, make_server
from pdserve.cluster.serving.metrics import ServingMetrics
from pdserve.cluster.serving.server import create_app
from pdserve.engine.deploy_config import ServerSettings
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.frontend import QueueFullError, RequestFailedError

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


def test_a_taken_port_and_a_foreign_host_fail_at_once_with_the_cause() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind_socket("127.0.0.1", port)
    with pytest.raises(ListenError, match="not an address of this machine"):
        bind_socket("192.0.2.77", 8000)  # TEST-NET-1: never local
    with pytest.raises(ListenError, match="does not resolve"):
        bind_socket("no-such-host.invalid", 8000)


def test_a_dead_ray_address_fails_in_seconds() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    start = time.monotonic()
    with pytest.raises(RayAddressError, match=f"no Ray cluster answers at .*:{port}"):
        check_ray_address(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (LAUGHS, "expand to over 100000 values"),
        (b"name: caf\xe9\n", "not UTF-8 text (byte 0xe9 on line 1)"),
        ("a: &a [*a]\n", "refers to a node that contains it"),
        ("name: [" + ", ".join(["word"] * 5000) + "]\n", "name: must be a valid string"),
    ],
)
def test_yaml_is_read_bounded_and_never_echoed(
    tmp_path: Path, text: str | bytes, expected: str
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.monotonic()
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert expected in str(e.value) and len(str(e.value)) < 400
    assert time.monotonic() - start < 5


class _SlowFrontend:
    """Streams that yield once before producing a token, like the real one's first hop."""

    tokenizer = None
    max_model_len = 64
    on_finish = None

    def __init__(self) -> None:
        self.release = asyncio.Event()

    def stream(self, prompt: object, params: SamplingParams, request_id: object = None):  # type: ignore[no-untyped-def]
        if prompt == "fail":
            return self._fail()
        return self._stream()

    async def _stream(self) -> AsyncIterator[str]:
        await self.release.wait()
        yield "token"

    async def _fail(self) -> AsyncIterator[str]:
        await asyncio.sleep(0)
        raise RequestFailedError("a worker died")
        yield "never"


def test_the_admission_bound_is_exact_under_a_burst_and_released() -> None:
    async def go() -> None:
        fe = _SlowFrontend()
        gate = AdmissionGate(fe, limit=50)
        failures: list[str] = []
        gate.on_failure = failures.append

        async def one() -> str:
            try:
                stream = gate.stream("p", SamplingParams())
            except QueueFullError as e:
                assert 1 <= e.retry_after <= 60
                return "429"
            await asyncio.sleep(0)  # the hop at which the old count lagged
            async for _ in stream:
                pass
            return "200"

        tasks = [asyncio.create_task(one()) for _ in range(1000)]
        await asyncio.sleep(0.05)
        assert gate.inflight == 50
        fe.release.set()
        results = await asyncio.gather(*tasks)
        assert results.count("200") == 50 and results.count("429") == 950
        assert gate.inflight == 0 and failures.count("queue_full") == 950
        dropped = gate.stream("p", SamplingParams())  # never read: released when dropped
        assert gate.inflight == 1
        del dropped
        assert gate.inflight == 0
        with pytest.raises(RequestFailedError):
            async for _ in gate.stream("fail", SamplingParams()):
                pass
        assert failures[-1] == "failed" and gate.inflight == 0

    asyncio.run(go())


def test_the_failure_counter_is_in_metrics_from_the_start() -> None:
    metrics = ServingMetrics("m")
    text = metrics.render().decode()
    assert 'pdserve:request_failure_total{model_name="m",reason="failed"} 0.0' in text
    metrics.observe_failure("failed")
    assert 'reason="failed"} 1.0' in metrics.render().decode()


@pytest.fixture(scope="module")
def slow_server() -> Iterator[int]:
    fe = FakeFrontend()
    app = create_app(fe, ServerSettings(), body_timeout_s=1.0)  # type: ignore[arg-type]
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(app, "127.0.0.1", 0)
    server.config.timeout_keep_alive = 1
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def _read_all(conn: socket.socket, timeout: float) -> bytes:
    conn.settimeout(timeout)
    data = b""
    while chunk := conn.recv(4096):
        data += chunk
    return data


def test_a_slow_body_gets_408_and_a_silent_connection_is_closed(slow_server: int) -> None:
    with socket.create_connection(("127.0.0.1", slow_server)) as conn:
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        conn.sendall(f"{head}Content-Type: application/json\r\n\r\n{{".encode())
        reply = _read_all(conn, 10)
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply
    with socket.create_connection(("127.0.0.1", slow_server)) as conn:
        start = time.monotonic()
        assert _read_all(conn, 10) == b""  # closed by the server, not by our timeout
        assert time.monotonic() - start < 5


def test_oversized_headers_are_refused(slow_server: int) -> None:
    with socket.create_connection(("127.0.0.1", slow_server)) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        reply = _read_all(conn, 10)
    assert reply.startswith(b"HTTP/1.1 431") and b"16384 bytes" in reply


def test_status_and_down_speak_token_auth_when_a_token_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pdserve.cluster.launch.ray_env import needs_token_mode

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    (tmp_path / "token").write_text("t" * 32)
    for mode in ("disabled", "", "k8s"):
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
        assert needs_token_mode()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert not needs_token_mode()  # already
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    assert not needs_token_mode()  # no token anywhere: the mode stays as set
