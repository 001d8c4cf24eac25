"""KV through a staging ring both ends can address: shared host memory or one GPU's memory.

Used when the two ends of a link share a machine (``host``) or a GPU (``cuda_ipc``), where
NCCL cannot run (two ranks on one GPU) or a socket would copy the bytes twice more. The
receiver owns a ring of ``slots`` fixed-size slots and publishes it at link set-up; the sender
maps it. Each tensor travels as chunks of at most a slot:

1. the sender's copy thread waits until the slot is free (a *credit* for the chunk that used it
   last has come back), copies the chunk in, waits for that copy to finish and sends a small
   *notice* (chunk number and size) over the link's gloo group;
2. the receiver, waiting on a tensor, takes each notice in order, copies the slot out into the
   tensor (into the paged cache itself when it lands in place), waits for that copy and sends
   the slot's credit back.

Only the forward's own thread is never blocked: ``send`` queues, the copy thread does the rest,
``flush`` waits until every chunk was received (so no message of this link is pending while the
link is idle: see ``KVLink`` on idle links). Notices and credits are 16-byte gloo messages; the
bytes themselves never touch a socket.

The ring itself: ``kv_transfer.ring``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine.kv_quant import movable
from pdserve.kv_transfer.descriptor import TransferProtocolError
from pdserve.kv_transfer.ring import Ring

logger = logging.getLogger(__name__)

SENDER, RECEIVER = 0, 1


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, as a flat uint8 view (fp8 codes included)."""
    return movable(tensor).reshape(-1).view(torch.uint8)


def _spans(nbytes: int, slot_bytes: int) -> list[tuple[int, int]]:
    return [(o, min(slot_bytes, nbytes - o)) for o in range(0, nbytes, slot_bytes)]


class StagedSender:
    """The sending end: ``send`` queues a tensor, a copy thread moves it through the ring."""

    def __init__(self, pg: Any, ring: Ring, device: torch.device, name: str) -> None:
        self._pg, self._ring, self._device = pg, ring, device
        self._queue: queue.Queue[tuple[torch.Tensor, Any] | None] = queue.Queue()
        self._sent = 0  # chunks notified
        self._credited = 0  # credits taken back
        # a credit's receive is posted with its chunk's notice, so the receiver's credit
        # never waits for it; all are taken by flush: none stays posted while the link idles
        self._credits: deque[tuple[Any, torch.Tensor]] = deque()
        self._error: BaseException | None = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name=f"kv-stage-{name}", daemon=True)
        self._thread.start()

    def send(self, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise RuntimeError(f"staged send failed: {self._error}") from self._error
        tensor = tensor.contiguous()  # first: a copy it makes is queued before the event
        event = None
        if tensor.device.type == "cuda":  # the copy waits for the forward that made it
            event = torch.cuda.Event()
            event.record()
        self._queue.put((tensor, event))

    def flush(self) -> None:
        """Wait until every queued chunk was copied out by the receiver (credits all back)."""
        self._queue.join()
        if self._error is not None:
            raise RuntimeError(f"staged send failed: {self._error}") from self._error
        while self._credited < self._sent:
            self._take_credit()

    def _take_credit(self) -> None:
        work, credit = self._credits.popleft()
        work.wait()
        if int(credit) != self._credited:
            raise TransferProtocolError(f"credit {int(credit)}, expected {self._credited}")
        self._credited += 1

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is not None and self._error is None:
                    self._copy(*job)
            except BaseException as e:  # flush and the next send report it
                logger.error("staged send failed: %s", e)
                self._error = e
            finally:
                self._queue.task_done()
            if job is None:
                return

    def _copy(self, tensor: torch.Tensor, event: Any) -> None:
        flat = _flat(tensor)
        if self._stream is not None and event is not None:
            self._stream.wait_event(event)
        for offset, n in _spans(flat.numel(), self._ring.slot_bytes):
            while self._sent - self._credited >= self._ring.slots:  # the slot is still read
                self._take_credit()
            slot = self._ring.slot(self._sent, n)
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    slot.copy_(flat[offset : offset + n], non_blocking=True)
                self._stream.synchronize()
            else:
                slot.copy_(flat[offset : offset + n])
            notice = torch.tensor([self._sent, n], dtype=torch.int64)
            credit = torch.zeros(1, dtype=torch.int64)
            self._credits.append((self._pg.recv([credit], RECEIVER, 0), credit))
            self._pg.send([notice], RECEIVER, 0).wait()
            self._sent += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._ring.close()


class StagedReceiver:
    """The receiving end: ``recv`` posts a tensor's notices at once; its work's ``wait`` copies
    the chunks out in order (an earlier tensor's first)."""

    def __init__(self, pg: Any, ring: Ring, device: torch.device) -> None:
        self._pg, self._ring, self._device = pg, ring, device
        # copies out on a stream of their own: a credit waits for its copy, not for the decode
        # steps queued on the default stream
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._order: deque[StagedWork] = deque()  # posted, not yet copied out
        self._next = 0  # the next chunk number
        self._credits: list[Any] = []  # credit sends in flight (done once the sender takes them)

    def recv(self, tensor: torch.Tensor) -> StagedWork:
        if not tensor.is_contiguous():
            raise ValueError("a staged receive needs a contiguous tensor")
        flat = _flat(tensor)
        spans = _spans(flat.numel(), self._ring.slot_bytes)
        notices = [torch.zeros(2, dtype=torch.int64) for _ in spans]
        works = [self._pg.recv([n], SENDER, 0) for n in notices]
        ready = None
        if self._stream is not None:
            # the destination was allocated on the caller's stream, where kernels that used its
            # memory before (freed, then handed out again by the caching allocator) may still be
            # queued: the side stream's copies wait for them
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self._device))
        work = StagedWork(self, flat, spans, notices, works, ready)
        self._order.append(work)
        return work

    def _complete(self, work: StagedWork, timeout: Any) -> None:
        while self._order and not work.done:
            self._copy_out(self._order[0], timeout)

    def _copy_out(self, work: StagedWork, timeout: Any) -> None:
        if self._stream is not None and work.ready is not None:
            self._stream.wait_event(work.ready)  # once per tensor: its chunks share it
        while work.next_chunk < len(work.spans):
            i = work.next_chunk
            if timeout is None:
                work.works[i].wait()
            else:
                work.works[i].wait(timeout)
            offset, n = work.spans[i]
            seq, size = (int(x) for x in work.notices[i])
            if seq != self._next or size != n:
                raise TransferProtocolError(
                    f"staged chunk {seq} of {size} bytes, expected {self._next} of {n}"
                )
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    work.flat[offset : offset + n].copy_(self._ring.slot(seq, n), non_blocking=True)
                self._stream.synchronize()
            else:
                work.flat[offset : offset + n].copy_(self._ring.slot(seq, n))
            credit = torch.tensor([seq], dtype=torch.int64)
            self._credits = [w for w in self._credits if not w.is_completed()]
            self._credits.append(self._pg.send([credit], SENDER, 0))
            self._next += 1
            work.next_chunk += 1
        self._order.popleft()

    def release_peer(self) -> None:
        """The sender's process died: what it held of the ring is let go (``Ring``)."""
        self._ring.release_peer()

    def close(self) -> None:
        self._order.clear()
        self._credits.clear()
        self._ring.close()


@dataclass
class StagedWork:
    """One posted staged receive (``dist.Work``'s ``wait``, with an optional timeout)."""

    owner: StagedReceiver
    flat: torch.Tensor  # the destination's bytes
    spans: list[tuple[int, int]]  # its chunks: (offset, bytes)
    notices: list[torch.Tensor]  # each chunk's notice, as it lands
    works: list[Any]  # the notices' posted receives
    ready: Any = None  # CUDA: an event on the caller's stream the copies wait for
    next_chunk: int = 0

    @property
    def done(self) -> bool:
        return self.next_chunk == len(self.spans)

    def wait(self, timeout: Any = None) -> bool:
        self.owner._complete(self, timeout)
        return True
