"""The HTTP listener: its socket bound up front (so a taken port or a foreign host fails at once,
with the cause), and uvicorn configured with bounds on what one connection may hold.

Bounds (docs/operations.md, "Limits"): request headers at most ``MAX_HEADER_BYTES`` (h11's
incomplete-event limit: a larger head is answered 400 and closed); a new connection that sends
nothing for ``IDLE_CONNECTION_S`` is closed, as an idle keep-alive one is; a body must arrive
within ``BODY_TIMEOUT_S`` (server.BodyLimitMiddleware answers 408) and fit
``server.max_request_bytes`` (413).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 16 * 1024
IDLE_CONNECTION_S = 5
BODY_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0


class ListenError(RuntimeError):
    """The HTTP port cannot be listened on; the message says why and what to change."""


class IdleClosingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that also closes a fresh connection that stays silent (uvicorn
    only times out idle keep-alive connections, so a client could open thousands and wait)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or ListenError naming the cause and the fix."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ListenError(
            f"server.host {host!r} does not resolve ({e.strerror}): use an address of this "
            "machine, e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ListenError(_why(host, port, e)) from None
    sock.setblocking(False)
    return sock


def _why(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use: stop what listens there "
            f"(`ss -ltnp 'sport = :{port}'`) or set server.port to a free port"
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return (
            f"server.host {host!r} is not an address of this machine (the controller runs on "
            "the node where `pdserve up` runs): use 127.0.0.1, 0.0.0.0 or one of its addresses"
        )
    if e.errno == errno.EACCES:
        return f"no permission to listen on port {port}: use a port above 1023"
    return f"cannot listen on {host}:{port}: {e.strerror or e}"


def make_server(app: Any, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=IdleClosingH11Protocol,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=IDLE_CONNECTION_S,
        log_level="warning",
        access_log=False,
    )
    return uvicorn.Server(config)


async def serve(server: uvicorn.Server, sock: socket.socket) -> None:
    """Run the server on ``sock``; uvicorn's startup ``sys.exit`` becomes a ListenError, so it
    reaches whoever waits for the server instead of vanishing in the event loop."""
    try:
        await server.serve(sockets=[sock])
    except SystemExit as e:
        raise ListenError(f"the HTTP server stopped at start (exit code {e.code})") from None


async def wait_started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    """Until ``server`` answers; the task's error if it ended first; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while not server.started:
        if task.done():
            task.result()
            raise ListenError("the HTTP server ended before it started")
        if loop.time() > deadline:
            raise ListenError(f"the HTTP server did not start in {START_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.05)
