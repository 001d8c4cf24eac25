"""Who may join a KV link or a TP group: the peers holding the deployment's secret.

A group forms on a torch ``TCPStore`` that one member hosts (a decode replica for a KV link, the
leader for a prefill TP group). The store listens on the host's interface only (``bound_store``:
torch binds every interface unless handed a socket), and it speaks no authentication: anyone
who reaches the port can read and set keys. So a group is made in three steps:

1. **Store handshake.** The host writes a fresh nonce. Each joiner takes a slot (``add``), writes
   ``HMAC(secret, "join", name, nonce, slot)`` into it and waits for the host's answer; the host
   checks every slot, answers a good proof with ``HMAC(secret, "host", ...)`` and a bad one with
   a refusal (logged), so a stranger neither blocks the real peer nor learns anything, and a
   peer with another secret fails at once with a clear error.
2. **The process group** on the store, under the link's name.
3. **Proof over the group.** Every rank contributes ``HMAC(secret, "member", name, nonce, rank)``
   to one all-reduce and checks every other rank's. The store's keys (including the rendezvous
   addresses the backend writes) could still be overwritten by a stranger, but a group whose
   other end is not a holder of the secret fails here, before any KV is sent or received.

``secret=None`` (benchmarks and in-process tests) skips steps 1 and 3.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdserve.engine.parallel import make_process_group

logger = logging.getLogger(__name__)

NONCE_KEY = "pdserve/auth/nonce"
SEQ_KEY = "pdserve/auth/seq"
PROOF_BYTES = 32  # SHA-256
POLL_S = 0.01


class PeerRefused(ConnectionError):
    """A group member could not prove the deployment's secret (or refused ours)."""


@dataclass(frozen=True)
class GroupAuth:
    """How this process takes part in a group's handshake: the deployment's secret, and whether
    it hosts the store (it then admits ``peers`` joiners)."""

    secret: bytes
    hosting: bool
    peers: int = 1


def bound_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A master store on a free port of ``host``'s interface only (read it from ``.port``).

    torch's TCPStore binds the wildcard address itself; handed a listening socket
    (``master_listen_fd``) it serves on that one, so we bind it to the interface peers use.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    port = sock.getsockname()[1]
    fd = sock.detach()  # the store owns the socket from here
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(
            host, port, world_size, True, timeout, wait_for_workers=False, master_listen_fd=fd
        )
    except BaseException:
        os.close(fd)
        raise
    store.set(NONCE_KEY, os.urandom(16).hex())
    return store


def proof(secret: bytes, *parts: object) -> str:
    """HMAC-SHA256 of the parts under the secret, in hex (the store holds strings)."""
    message = "\x1f".join(str(p) for p in parts).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def handshake(store: dist.Store, auth: GroupAuth, name: str, timeout_s: float) -> str:
    """Step 1 on either side; returns the store's nonce. Raises ``PeerRefused``."""
    deadline = time.monotonic() + timeout_s
    _wait_for(store, NONCE_KEY, deadline, f"{name}: the store never set a nonce")
    nonce = store.get(NONCE_KEY).decode()
    if auth.hosting:
        _admit(store, auth, name, nonce, deadline)
    else:
        _prove(store, auth, name, nonce, deadline)
    return nonce


def _admit(store: dist.Store, auth: GroupAuth, name: str, nonce: str, deadline: float) -> None:
    admitted, seen, pending = 0, 0, set[int]()
    while admitted < auth.peers:
        taken = store.add(SEQ_KEY, 0)
        pending.update(range(seen + 1, taken + 1))
        seen = max(seen, taken)
        for slot in sorted(pending):  # a slot taken and never written blocks no other
            if not store.check([f"pdserve/auth/join/{slot}"]):
                continue
            pending.discard(slot)
            claim = store.get(f"pdserve/auth/join/{slot}")
            if hmac.compare_digest(claim, proof(auth.secret, "join", name, nonce, slot).encode()):
                store.set(f"pdserve/auth/ok/{slot}", proof(auth.secret, "host", name, nonce, slot))
                admitted += 1
            else:
                logger.warning("%s: refused a peer without the deployment's secret", name)
                store.set(f"pdserve/auth/no/{slot}", "refused")
        if admitted < auth.peers:
            if time.monotonic() > deadline:
                raise PeerRefused(
                    f"{name}: {auth.peers - admitted} peer(s) never proved the deployment's "
                    "secret before the link's timeout"
                )
            time.sleep(POLL_S)


def _prove(store: dist.Store, auth: GroupAuth, name: str, nonce: str, deadline: float) -> None:
    slot = store.add(SEQ_KEY, 1)
    store.set(f"pdserve/auth/join/{slot}", proof(auth.secret, "join", name, nonce, slot))
    ok, no = f"pdserve/auth/ok/{slot}", f"pdserve/auth/no/{slot}"
    while not store.check([ok]):
        if store.check([no]):
            raise PeerRefused(
                f"{name}: the group's host refused this peer: it holds another deployment's "
                "secret (a worker of another deployment, or a stranger)"
            )
        if time.monotonic() > deadline:
            raise PeerRefused(f"{name}: the group's host never answered the handshake")
        time.sleep(POLL_S)
    if not hmac.compare_digest(
        store.get(ok), proof(auth.secret, "host", name, nonce, slot).encode()
    ):
        raise PeerRefused(f"{name}: the store's host does not hold the deployment's secret")


def _wait_for(store: dist.Store, key: str, deadline: float, message: str) -> None:
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise PeerRefused(message)
        time.sleep(POLL_S)


def verify_group(
    pg: dist.ProcessGroup,
    rank: int,
    size: int,
    secret: bytes,
    name: str,
    nonce: str,
    device: torch.device,
) -> None:
    """Step 3: every rank proves the secret to every other over the group itself."""
    rows = torch.zeros(size, PROOF_BYTES * 2, dtype=torch.int32)
    rows[rank] = torch.tensor(
        list(proof(secret, "member", name, nonce, rank).encode()), dtype=torch.int32
    )
    rows = rows.to(device)
    pg.allreduce([rows]).wait()
    got = rows.cpu()
    for r in range(size):
        want = torch.tensor(
            list(proof(secret, "member", name, nonce, r).encode()), dtype=torch.int32
        )
        if not torch.equal(got[r], want):
            raise PeerRefused(
                f"{name}: rank {r} of the group did not prove the deployment's secret: a "
                "stranger took a member's place; the group is refused"
            )


def join_group(
    store: dist.Store,
    auth: GroupAuth | None,
    name: str,
    backend: str,
    rank: int,
    size: int,
    device: torch.device,
    timeout_s: float,
) -> dist.ProcessGroup:
    """Steps 1-3: the group ``name`` on ``store``, every member proven (unless ``auth`` is
    None). ``device``: where the backend's tensors live (cuda for nccl, cpu for gloo)."""
    nonce = handshake(store, auth, name, timeout_s) if auth is not None else ""
    pg = make_process_group(backend, dist.PrefixStore(name, store), rank, size)
    if auth is not None:
        verify_group(pg, rank, size, auth.secret, name, nonce, device)
    return pg
