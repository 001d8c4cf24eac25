"""A KV link: a 2-rank torch.distributed group between one prefill rank and one decode replica.

Rank 0 sends, rank 1 receives. The group is built directly on a TCPStore (the receiver hosts it)
rather than through ``init_process_group``, because one process holds many such groups (one per
peer) next to its tensor-parallel group; a dead peer then breaks only its own link.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from pdserve.engine.kv_quant import movable
from pdserve.kv_transfer.auth import GroupAuth, bound_store, join_group
from pdserve.kv_transfer.descriptor import MAX_HEADER_BYTES, TransferHeader, TransferProtocolError
from pdserve.kv_transfer.errors import KVLinkError as KVLinkError  # re-exported: older imports

logger = logging.getLogger(__name__)

SENDER, RECEIVER = 0, 1
_MAGIC = 0x5044_4B56  # "PDKV": guards against a stream that lost its framing
# A header travels in one fixed-size frame (magic, size, then the msgpack bytes; a rare larger
# header spills into a second message), so the receiver can post the receive before the sender
# sends. Over gloo a message sent before its receive is posted costs a round trip: its bytes
# wait until the receiver's "posted" notice comes back.
FRAME_BYTES = 16 << 10
_PREFIX_BYTES = 16
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
        # sender: seconds spent in flush, waiting for queued sends to leave (in a prefill, the
        # part of the transfer that the forward pass did not hide)
        self.flush_wait_s = 0.0

    @staticmethod
    def host_store(host: str, timeout_s: float = 300.0) -> dist.TCPStore:
        """Receiver side: a rendezvous store on a free port of ``host``'s interface only (read
        the port back from ``store.port``)."""
        return bound_store(host, 2, timeout_s)

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
        auth: GroupAuth | None = None,
    ) -> KVLink:
        """Join the 2-rank group; blocks until the peer joins too (run it off the event loop).
        With ``auth`` both ends prove the deployment's secret first (``kv_transfer.auth``):
        a peer that cannot raises ``PeerRefused`` and no KV moves."""
        if store is None:
            timeout = datetime.timedelta(seconds=timeout_s)
            store = dist.TCPStore(host, port, 2, False, timeout)
        wire_device = device if backend == "nccl" else torch.device("cpu")
        pg = join_group(store, auth, name, backend, rank, 2, wire_device, timeout_s)
        logger.info("kv link %s up: rank %d, backend %s", name, rank, backend)
        return cls(name, pg, rank, wire_device, store)

    # -- sending (prefill rank) ------------------------------------------------------------

    def send_header(self, header: TransferHeader) -> None:
        data = header.encode()
        frame = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
        frame[:_PREFIX_BYTES] = torch.tensor([_MAGIC, len(data)], dtype=torch.int64).view(
            torch.uint8
        )
        head, spill = data[: FRAME_BYTES - _PREFIX_BYTES], data[FRAME_BYTES - _PREFIX_BYTES :]
        frame[_PREFIX_BYTES : _PREFIX_BYTES + len(head)] = _bytes_tensor(head)
        self._send(frame.to(self.device))
        if spill:
            self._send(_bytes_tensor(spill).to(self.device))

    def send_tensor(self, tensor: torch.Tensor) -> None:
        """Queue an asynchronous send; the tensor is kept alive until ``flush``. It never waits
        for the receiver: over gloo a send whose receive is not posted yet is announced, and
        its bytes follow when the receive is (the receiver posts them as the header arrives,
        while a prefill is still computing layer 0); NCCL pairs them itself."""
        self._send(tensor.to(self.device).contiguous())

    def flush(self) -> None:
        """Wait until every queued send has left."""
        pending, self._pending = self._pending, []
        start = time.perf_counter()
        for work, _ in pending:
            work.wait()
        self.flush_wait_s += time.perf_counter() - start

    def _send(self, tensor: torch.Tensor) -> None:
        # a scaled KV format (fp8 codes) travels as its bytes: not every NCCL knows float8
        work = self._pg.send([movable(tensor)], RECEIVER, 0)
        self._pending.append((work, tensor))
        self.bytes_sent += tensor.numel() * tensor.element_size()

    # -- receiving (decode replica) --------------------------------------------------------

    def recv_header(self) -> TransferHeader:
        """Block until the next header arrives (no timeout: an idle link waits indefinitely)."""
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8, device=self.device)
        self.recv_tensor(frame).wait()
        frame = frame.cpu()
        magic, size = (int(x) for x in frame[:_PREFIX_BYTES].view(torch.int64).tolist())
        if magic != _MAGIC or not 0 < size <= MAX_HEADER_BYTES:
            raise TransferProtocolError(
                f"link {self.name}: bad frame (magic {magic:#x}, size {size})"
            )
        data = frame[_PREFIX_BYTES : _PREFIX_BYTES + size].numpy().tobytes()
        if size > len(data):
            spill = torch.empty(size - len(data), dtype=torch.uint8, device=self.device)
            self.recv_tensor(spill).wait()
            data += spill.cpu().numpy().tobytes()
        return TransferHeader.decode(data)

    def recv_tensor(self, tensor: torch.Tensor) -> dist.Work:
        return self._pg.recv([movable(tensor)], SENDER, 0)  # a view: lands in ``tensor``

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


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
