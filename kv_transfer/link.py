"""A KV link: a 2-rank torch.distributed group between one prefill rank and one decode replica.

Rank 0 sends, rank 1 receives. The group is built directly on a TCPStore (the receiver hosts it)
rather than through ``init_process_group``, because one process holds many such groups (one per
peer) next to its tensor-parallel group; a dead peer then breaks only its own link. What the two
ends say through the store besides (keys, errors, the backend agreement): ``link_store``.

**Idle links.** A link may sit idle for hours between batches, and a process group enforces its
timeout on every posted operation (gloo fails a receive after it; NCCL's watchdog tears the
communicator down, point-to-point operations included). So no operation is ever posted on the
group while the link is idle: a batch's *header* travels through the store (the sender sets key
``n``; the receiver blocks in ``store.wait`` on it, which has no group timeout and wakes the
moment the key is set), and only then are the batch's tensor receives posted, each bounded by
the group's timeout and the receiver's stall bound. A receiver told to stop (``stop``) wakes
itself by writing a closing header into the key it waits on.

**Backends** (``kv_transfer.peers``): the two ends agree on one at connect time: NCCL between
GPUs, a staging ring between two ends of one GPU (CUDA IPC) or one machine (shared host memory),
gloo otherwise. The staged ones keep the same contract: ``send_tensor`` queues, ``flush`` waits,
``recv_tensor`` returns a work to ``wait`` on (``kv_transfer.staged``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from pdserve.engine.kv_quant import movable
from pdserve.engine.parallel import make_process_group
from pdserve.kv_transfer.auth import GroupAuth, bound_store, handshake, verify_group
from pdserve.kv_transfer.descriptor import MAX_HEADER_BYTES, TransferHeader, TransferProtocolError
from pdserve.kv_transfer.errors import KVLinkError as KVLinkError  # re-exported: older imports
from pdserve.kv_transfer.link_store import (
    ERROR,
    HEADER_KEY,
    RING_KEY,
    RING_OPEN_KEY,
    agree_backend,
    get_checked,
    set_bytes,
)
from pdserve.kv_transfer.link_store import RECEIVER as RECEIVER  # re-exported: a link's ranks
from pdserve.kv_transfer.link_store import SENDER as SENDER
from pdserve.kv_transfer.peers import BACKENDS as BACKENDS
from pdserve.kv_transfer.peers import STAGED
from pdserve.kv_transfer.ring import create_ring, open_ring
from pdserve.kv_transfer.staged import StagedReceiver, StagedSender

logger = logging.getLogger(__name__)

# one idle wait on the store; a wait that ends without a header just waits again (each end
# logs a line in torch's C++ layer, hence not seconds)
IDLE_WAIT_S = 3600.0
# bounds each posted send/receive of a batch (never an idle link): a batch's receives are
# posted when its header comes and its sends as the forward makes each layer, so minutes are
# already a stuck peer (a live peer that tore its group down is only noticed this way)
GROUP_TIMEOUT_S = 300.0


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``: the receiver compares it with its cache's device to land
    KV in place, and a tensor's device always carries its index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _staged_plane(
    store: dist.Store, backend: str, rank: int, device: torch.device, pg: Any, name: str
) -> StagedSender | StagedReceiver:
    """The staging ring: the receiver makes it, the sender maps it; its name then goes."""
    if rank == RECEIVER:
        try:
            ring, description = create_ring(backend, device)
        except (OSError, RuntimeError) as e:
            store.set(RING_KEY, ERROR + f"staging ring not made: {e}")
            raise
        set_bytes(store, RING_KEY, description)
        try:
            get_checked(store, RING_OPEN_KEY)
        except BaseException:
            ring.close()
            raise
        finally:
            ring.unlink()
        return StagedReceiver(pg, ring, device)
    description = get_checked(store, RING_KEY)
    try:
        ring = open_ring(description, device)
    except (OSError, RuntimeError, TransferProtocolError) as e:  # the receiver waits on it
        store.set(RING_OPEN_KEY, ERROR + f"the sender could not map the staging ring: {e}")
        raise
    store.set(RING_OPEN_KEY, "1")
    return StagedSender(pg, ring, device, name)


class KVLink:
    """One direction of KV traffic over a private process group. Not thread-safe per direction:
    a link has one sending thread (prefill rank) and one receiving thread (decode replica)."""

    def __init__(
        self,
        name: str,
        pg: Any,
        rank: int,
        device: torch.device,
        store: dist.Store,
        backend: str = "gloo",
        staged: StagedSender | StagedReceiver | None = None,
        waiter: dist.Store | None = None,
    ) -> None:
        self.name = name
        self.rank = rank
        self.backend = backend  # what the two ends agreed on (metrics and status name it)
        # where tensors on the wire live: the worker's device for nccl and the staged
        # backends, cpu for gloo
        self.device = device
        self._pg = pg
        self._store = store  # keep the rendezvous store alive as long as the group
        self._waiter = waiter or store  # the receiver's own connection for idle waits
        self._staged = staged
        self._seq = 0  # headers sent (sender) or taken (receiver)
        self._stopped = threading.Event()
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
        group_timeout_s: float = GROUP_TIMEOUT_S,
    ) -> KVLink:
        """Join the 2-rank group; blocks until the peer joins too (run it off the event loop).
        ``backend`` is the configured one (``auto`` or a name in ``peers.BACKENDS``); the ends
        agree on what it means for them. With ``auth`` both ends prove the deployment's secret
        first (``kv_transfer.auth``): a peer that cannot raises ``PeerRefused`` and no KV
        moves. ``group_timeout_s`` bounds each posted operation of a batch (never an idle
        link's wait)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, 2, False, timeout)
        # kv_transfer.auth's three steps, with the ends agreeing on a backend after the first
        nonce = handshake(store, auth, name, timeout_s) if auth is not None else ""
        chosen = agree_backend(store, backend, rank, device)
        group_backend = "nccl" if chosen == "nccl" else "gloo"
        group_store = dist.PrefixStore(name, store)
        pg = make_process_group(group_backend, group_store, rank, 2, group_timeout_s)
        staged = None
        try:
            if auth is not None:
                group_device = device if chosen == "nccl" else torch.device("cpu")
                verify_group(pg, rank, 2, auth.secret, name, nonce, group_device)
            if chosen in STAGED:
                staged = _staged_plane(store, chosen, rank, device, pg, name)
        except BaseException:  # a link not made holds no group
            with contextlib.suppress(RuntimeError):
                pg.shutdown()
            raise
        waiter = None
        if rank == RECEIVER:  # idle waits block a store connection: one of its own
            waiter = dist.TCPStore(host, port, 2, False, timeout)
        wire_device = _indexed(device) if chosen != "gloo" else torch.device("cpu")
        logger.info("kv link %s up: rank %d, backend %s", name, rank, chosen)
        return cls(name, pg, rank, wire_device, store, chosen, staged, waiter)

    # -- sending (prefill rank) ------------------------------------------------------------

    def send_header(self, header: TransferHeader) -> None:
        """Announce a batch: the receiver wakes and posts its receives (see the module doc)."""
        set_bytes(self._store, f"{HEADER_KEY}{self._seq}", header.encode())
        self._seq += 1

    def send_tensor(self, tensor: torch.Tensor) -> None:
        """Queue an asynchronous send; the tensor is kept alive until ``flush``. It never waits
        for the receiver: over gloo a send whose receive is not posted yet is announced, and
        its bytes follow when the receive is (the receiver posts them as the header arrives,
        while a prefill is still computing layer 0); NCCL pairs them itself; a staged link's
        copy thread takes it."""
        self.bytes_sent += tensor.numel() * tensor.element_size()
        if isinstance(self._staged, StagedSender):
            self._staged.send(tensor)
            return
        tensor = tensor.to(self.device).contiguous()
        # a scaled KV format (fp8 codes) travels as its bytes: not every NCCL knows float8
        work = self._pg.send([movable(tensor)], RECEIVER, 0)
        self._pending.append((work, tensor))

    def flush(self) -> None:
        """Wait until every queued send has left (a staged link: until it was received)."""
        pending, self._pending = self._pending, []
        start = time.perf_counter()
        if isinstance(self._staged, StagedSender):
            self._staged.flush()
        for work, _ in pending:
            work.wait()
        self.flush_wait_s += time.perf_counter() - start

    # -- receiving (decode replica) --------------------------------------------------------

    def recv_header(self) -> TransferHeader:
        """Block until the next header arrives: an idle link waits indefinitely, with nothing
        posted on its group. After ``stop``, a closing header."""
        key = f"{HEADER_KEY}{self._seq}"
        while not self._stopped.is_set():
            try:
                self._waiter.wait([key], datetime.timedelta(seconds=IDLE_WAIT_S))
                break
            except dist.DistStoreError as e:
                if "timeout" not in str(e):
                    raise
        if self._stopped.is_set():
            return TransferHeader.closing()
        data = self._waiter.get(key)
        self._waiter.delete_key(key)
        self._seq += 1
        if len(data) > MAX_HEADER_BYTES:
            raise TransferProtocolError(f"link {self.name}: header of {len(data)} bytes")
        return TransferHeader.decode(data)

    def recv_tensor(self, tensor: torch.Tensor) -> Any:
        """Post a receive into ``tensor`` (a view: the bytes land in it); ``wait`` on what it
        returns (``dist.Work``'s contract, optional timeout included)."""
        if isinstance(self._staged, StagedReceiver):
            return self._staged.recv(tensor)
        return self._pg.recv([movable(tensor)], SENDER, 0)

    def stop(self, peer_dead: bool = False) -> None:
        """Receiver side: end an idle wait for the next header (the peer is gone or replaced):
        a closing header is written into the key being waited on. ``peer_dead``: the sender's
        process died, so what it held of a GPU staging ring is let go too."""
        if peer_dead and isinstance(self._staged, StagedReceiver):
            self._staged.release_peer()
        self._stopped.set()
        try:
            set_bytes(self._store, f"{HEADER_KEY}{self._seq}", TransferHeader.closing().encode())
        except RuntimeError as e:
            logger.warning("kv link %s: stop not delivered: %s", self.name, e)

    def close(self) -> None:
        """Tell the receiver nothing more follows (sender side), then drop the group."""
        if self.rank == SENDER:
            try:
                self.flush()
                self.send_header(TransferHeader.closing())
            except RuntimeError as e:  # the peer may already be gone
                logger.warning("kv link %s: close message not delivered: %s", self.name, e)
        self._pending.clear()
        if self._staged is not None:
            self._staged.close()

    def abort(self) -> None:
        """Tear the group down after a failure; an idle receiver is told to stop. The peer's
        posted operations fail when its process is gone; a live peer's end at the latest after
        the group's timeout (gloo does not tell it of a shutdown)."""
        self._pending.clear()
        if self.rank == SENDER:
            with contextlib.suppress(RuntimeError):  # the receiver may be gone too
                self.send_header(TransferHeader.closing())
        else:
            self._stopped.set()
        try:
            self._pg.shutdown()
        except RuntimeError as e:
            logger.warning("kv link %s: shutdown failed: %s", self.name, e)
        if self._staged is not None:
            self._staged.close()
