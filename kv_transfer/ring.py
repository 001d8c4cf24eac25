"""The staging ring of a same-machine or same-GPU KV link (``kv_transfer.staged``): memory both
ends address, made by the receiver and mapped by the sender.

- ``host``: a file in /dev/shm (mode 0600, a random name, unlinked once the sender mapped it),
  pinned with ``cudaHostRegister`` on CUDA so copies to and from it run at full PCIe speed; in
  the temp folder when /dev/shm lacks room (Docker's default /dev/shm is 64 MiB, and touching a
  page past it kills the process with SIGBUS).
- ``cuda_ipc``: a CUDA allocation on the receiver's GPU, opened by the sender from its IPC
  handle. torch counts the sender's mapping in a shared counter the sender's process drops when
  it unmaps; a sender killed first never does, and the ring would stay allocated after the link
  went, so a receiver told its peer died (``release_peer``) drops the count on its behalf.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch

from pdserve.kv_transfer.descriptor import TransferProtocolError

logger = logging.getLogger(__name__)

RING_BYTES = 64 << 20  # per link: a few layers of a long prompt in flight at once
RING_SLOTS = 32  # 2 MiB slots: a short prompt's layers (one chunk each) do not lap the ring
_SHM_DIR = Path("/dev/shm")


@dataclass
class Ring:
    """The staging memory, as one flat uint8 tensor of ``slots * slot_bytes`` bytes."""

    data: torch.Tensor
    slots: int
    slot_bytes: int
    cleanup: Any = None  # called when the link goes
    path: Path | None = None  # a host ring's file, until the sender mapped it
    ipc_counter: tuple[bytes, int] | None = None  # a GPU ring's count of the sender's mapping

    def release_peer(self) -> None:
        """The sender died holding a GPU ring: drop its count, so the ring can be freed."""
        if self.ipc_counter is None:
            return
        counter, self.ipc_counter = self.ipc_counter, None
        try:
            torch.UntypedStorage._release_ipc_counter_cuda(*counter)
        except RuntimeError as e:
            logger.warning("staging ring: the dead sender's count not dropped: %s", e)

    def unlink(self) -> None:
        """The sender mapped the ring: its name goes (the memory stays until both unmap)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def slot(self, index: int, nbytes: int) -> torch.Tensor:
        start = (index % self.slots) * self.slot_bytes
        return self.data[start : start + nbytes]

    def close(self) -> None:
        if self.cleanup is not None:
            cleanup, self.cleanup = self.cleanup, None
            cleanup()


def create_ring(backend: str, device: torch.device, total: int | None = None) -> tuple[Ring, bytes]:
    """Receiver side: a ring (``RING_BYTES`` unless ``total``) and the msgpack description the
    sender opens it from."""
    total = total or RING_BYTES
    slot_bytes = total // RING_SLOTS
    if backend == "cuda_ipc":
        data = torch.empty(total, dtype=torch.uint8, device=device)
        # (device, handle, size, offset, ref counter handle, ref counter offset, event, sync)
        handle = list(data.untyped_storage()._share_cuda_())
        spec = {"kind": "cuda_ipc", "handle": handle, "bytes": total}
        ring = Ring(data, RING_SLOTS, slot_bytes, ipc_counter=(handle[4], handle[5]))
        return ring, msgpack.packb(spec)
    path = _ring_folder(total) / f"pdserve-kv-{secrets.token_hex(8)}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, total)
    finally:
        os.close(fd)
    try:
        data = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    unpin = _pin(data, device)

    def cleanup() -> None:
        path.unlink(missing_ok=True)
        if unpin is not None:
            unpin()

    spec = {"kind": "host", "path": str(path), "bytes": total}
    return Ring(data, RING_SLOTS, slot_bytes, cleanup, path), msgpack.packb(spec)


def _ring_folder(total: int) -> Path:
    """/dev/shm when it has room for the ring (and some to spare), else the temp folder."""
    if _SHM_DIR.is_dir() and shutil.disk_usage(_SHM_DIR).free >= 2 * total:
        return _SHM_DIR
    return Path(tempfile.gettempdir())


def open_ring(description: bytes, device: torch.device) -> Ring:
    """Sender side: map the receiver's ring."""
    spec = msgpack.unpackb(description)
    total = int(spec["bytes"])
    if spec["kind"] == "cuda_ipc":
        storage = torch.UntypedStorage._new_shared_cuda(*spec["handle"])
        data = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (total,), (1,))
        return Ring(data, RING_SLOTS, total // RING_SLOTS)
    path = Path(spec["path"])
    if not path.name.startswith("pdserve-kv-") or path.parent not in (
        _SHM_DIR,
        Path(tempfile.gettempdir()),
    ):
        raise TransferProtocolError(f"staging ring {path} is not a pdserve ring")
    data = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
    return Ring(data, RING_SLOTS, total // RING_SLOTS, _pin(data, device))


def _pin(data: torch.Tensor, device: torch.device) -> Any:
    """Page-lock host ring memory for fast copies to and from ``device``; returns the undo."""
    if device.type != "cuda":
        return None
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(data.data_ptr(), data.numel(), 0)) != 0:
        logger.warning("staging ring not pinned: host copies run at pageable speed")
        return None
    return lambda: cudart.cudaHostUnregister(data.data_ptr())
