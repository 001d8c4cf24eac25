"""A KV link: a 2-rank torch.distributed group between one prefill rank and one decode replica.

Rank 0 sends, rank 1 receives. The group is built directly on a TCPStore (the receiver hosts it)
rather than through ``init_process_group``, because one process holds many such groups (one per
peer) next to its tensor-parallel group; a dead peer then breaks only its own link.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch
import torch.distributed as dist

from pdserve.engine.parallel import make_process_group
from pdserve.kv_transfer.descriptor import MAX_HEADER_BYTES, TransferHeader, TransferProtocolError

logger = logging.getLogger(__name__)

SENDER, RECEIVER = 0, 1
_MAGIC = 0x5044_4B56  # "PDKV": guards against a stream that lost its framing
BACKENDS = ("auto", "gloo", "nccl")


def resolve_backend(backend: str, device: torch.device, same_gpu: bool = False) -> str:
    """``auto``: NCCL between CUDA tensors on different GPUs, gloo otherwise.

    NCCL cannot connect two ranks on one GPU, so a single-GPU deployment stages KV through host
    memory over gloo (slower; fine for development, not for production).
    """
    if backend not in BACKENDS:
        raise ValueError(f"kv transfer backend {backend!r} is unknown; use one of {BACKENDS}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" and not same_gpu else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            "kv transfer backend 'nccl' needs CUDA devices; use 'gloo' or 'auto' on CPU"
        )
    return backend


class KVLink:
    """One direction of KV traffic over a private process group. Not thread-safe per direction:
    a link has one sending thread (prefill rank) and one receiving thread (decode replica)."""

    def __init__(
        self, name: str, pg: Any, rank: int, device: torch.device, store: dist.Store
    ) -> None:
        self.name = name
        self.rank = rank
        self.device = device  # where tensors on the wire live (cuda for nccl, cpu for gloo)
        self._pg = pg
        self._store = store  # keep the rendezvous store alive as long as the group
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self.bytes_sent = 0

    @staticmethod
    def host_store(host: str, timeout_s: float = 300.0) -> dist.TCPStore:
        """Receiver side: a rendezvous store on a free port (read it back from ``store.port``)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        return dist.TCPStore(host, 0, 2, True, timeout, wait_for_workers=False)

    @classmethod
    def connect(
        cls,
        name: str,
        backend: str,
        rank: int,
        device: torch.device,
        host: str,
        port: int,
        store: dist.TCPStore | None = None,
        timeout_s: float = 300.0,
    ) -> KVLink:
        """Join the 2-rank group; blocks until the peer joins too (run it off the event loop)."""
        if store is None:
            timeout = datetime.timedelta(seconds=timeout_s)
            store = dist.TCPStore(host, port, 2, False, timeout)
        pg = make_process_group(backend, dist.PrefixStore(name, store), rank, 2)
        wire_device = device if backend == "nccl" else torch.device("cpu")
        logger.info("kv link %s up: rank %d, backend %s", name, rank, backend)
        return cls(name, pg, rank, wire_device, store)

    # -- sending (prefill rank) ------------------------------------------------------------

    def send_header(self, header: TransferHeader) -> None:
        data = header.encode()
        frame = torch.tensor([_MAGIC, len(data)], dtype=torch.int64, device=self.device)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        self._send(frame)
        self._send(payload)

    def send_tensor(self, tensor: torch.Tensor) -> None:
        """Queue an asynchronous send; the tensor is kept alive until ``flush``."""
        self._send(tensor.to(self.device).contiguous())

    def flush(self) -> None:
        """Wait until every queued send has left."""
        pending, self._pending = self._pending, []
        for work, _ in pending:
            work.wait()

    def _send(self, tensor: torch.Tensor) -> None:
        work = self._pg.send([tensor], RECEIVER, 0)
        self._pending.append((work, tensor))
        self.bytes_sent += tensor.numel() * tensor.element_size()

    # -- receiving (decode replica) --------------------------------------------------------

    def recv_header(self) -> TransferHeader:
        """Block until the next header arrives (no timeout: an idle link waits indefinitely)."""
        frame = torch.empty(2, dtype=torch.int64, device=self.device)
        self.recv_tensor(frame).wait()
        magic, size = (int(x) for x in frame.tolist())
        if magic != _MAGIC or not 0 < size <= MAX_HEADER_BYTES:
            raise TransferProtocolError(
                f"link {self.name}: bad frame (magic {magic:#x}, size {size})"
            )
        payload = torch.empty(size, dtype=torch.uint8, device=self.device)
        self.recv_tensor(payload).wait()
        return TransferHeader.decode(payload.cpu().numpy().tobytes())

    def recv_tensor(self, tensor: torch.Tensor) -> dist.Work:
        return self._pg.recv([tensor], SENDER, 0)

    def close(self) -> None:
        """Tell the receiver nothing more follows (sender side), then drop the group."""
        if self.rank == SENDER:
            try:
                self.send_header(TransferHeader.closing())
                self.flush()
            except RuntimeError as e:  # the peer may already be gone
                logger.warning("kv link %s: close message not delivered: %s", self.name, e)
        self._pending.clear()

    def abort(self) -> None:
        """Tear the group down after a failure (the peer's pending receives then fail)."""
        self._pending.clear()
        try:
            self._pg.shutdown()
        except RuntimeError as e:
            logger.warning("kv link %s: shutdown failed: %s", self.name, e)
