"""What the two ends of a KV link (``kv_transfer.link``) say through its rendezvous store.

Besides the process group's own rendezvous, the receiver-hosted TCPStore carries: the backend
agreement at connect time (the receiver names its device, the sender chooses), a staged link's
ring description and the sender's word that it mapped it, and every batch's header (key
``HEADER_KEY`` + its sequence number). An end that fails writes ``ERROR`` and the reason in
place of the value the other end waits for; ``get_checked`` raises it there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pdserve.kv_transfer.peers import device_identity, resolve_backend

SENDER, RECEIVER = 0, 1  # a link's two ranks
HEADER_KEY = "pdserve/kv/header/"
RING_KEY = "pdserve/kv/ring"  # a staged link's ring, as the sender opens it
RING_OPEN_KEY = "pdserve/kv/ring-open"
ERROR = "error: "
_RECEIVER_KEY = "pdserve/kv/receiver"  # the receiver's device_identity
_BACKEND_KEY = "pdserve/kv/backend"  # the sender's choice (or "error: why")


def get_checked(store: dist.Store, key: str, error: type[Exception] = RuntimeError) -> bytes:
    """A key the other end sets, or ``error`` with the reason it wrote instead (``ERROR``)."""
    value = store.get(key)
    if value.startswith(ERROR.encode()):
        raise error(value.decode()[len(ERROR) :])
    return value


def set_bytes(store: dist.Store, key: str, value: bytes) -> None:
    """``store.set`` with a bytes value (the store keeps bytes; torch's stub says str)."""
    store.set(key, value)  # type: ignore[arg-type]


def agree_backend(store: dist.Store, backend: str, rank: int, device: torch.device) -> str:
    """Both ends settle on one backend: the receiver names its device, the sender chooses."""
    if rank == RECEIVER:
        store.set(_RECEIVER_KEY, device_identity(device))
        return get_checked(store, _BACKEND_KEY, ValueError).decode()
    receiver = store.get(_RECEIVER_KEY).decode()
    try:
        chosen = resolve_backend(backend, device_identity(device), receiver)
    except ValueError as e:
        store.set(_BACKEND_KEY, ERROR + str(e))
        raise
    store.set(_BACKEND_KEY, chosen)
    return chosen
