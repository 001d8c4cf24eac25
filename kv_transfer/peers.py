"""Which way KV moves between two ends of a link: where each end is, and the backend that fits.

Each end names its device as ``<machine>/<device>``: the machine by its boot id and IPC
namespace (two Ray nodes started on one host share them, and can share memory), the device by its GPU's UUID (so two
workers given fractions of one GPU see the same name) or ``cpu``. The decode replica hosting a
link writes its name into the link's store; the prefill rank reads it, picks the backend and
writes its choice back, so both ends always agree (``KVLink.connect``).

Backends:

- ``nccl``: between GPUs (across machines, or two GPUs of one machine). NCCL cannot join two
  ranks of one communicator on one GPU.
- ``cuda_ipc``: both ends on one GPU; the receiver's staging ring lives on that GPU and the
  sender writes it through a CUDA IPC handle (device-to-device copies, no host round trip).
- ``host``: both ends on one machine; the staging ring is shared host memory (pinned on CUDA),
  written by the sender and read by the receiver: two memory copies, no socket. Named only:
  between CPU workers it measured no faster than gloo over loopback (docs/performance.md), and
  between GPUs NCCL or CUDA IPC is faster.
- ``gloo``: anything else (CPU across machines), over TCP through host memory.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import torch

BACKENDS = ("auto", "gloo", "nccl", "host", "cuda_ipc")
STAGED = ("host", "cuda_ipc")  # the backends that move KV through a staging ring


@functools.cache
def machine_id() -> str:
    """This boot of this host, and this IPC namespace: ends with the same id can share memory
    (containers on one host share the boot id, not their /dev/shm or CUDA IPC handles)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ipc = os.stat("/proc/self/ns/ipc").st_ino
    except OSError:  # not Linux: the host name alone
        boot, ipc = "noboot", 0
    return f"{socket.gethostname()}:{boot}:{ipc}"


def device_identity(device: torch.device) -> str:
    """``<machine>/<device>``: a CUDA device by its UUID, so fractions of one GPU match."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return f"{machine_id()}/cuda:{uuid}"
    return f"{machine_id()}/{device.type}"


def _split(identity: str) -> tuple[str, str]:
    machine, _, device = identity.rpartition("/")
    return machine, device


def resolve_backend(backend: str, sender: str, receiver: str) -> str:
    """The backend a link between devices ``sender`` and ``receiver`` (``device_identity``
    names) uses: ``backend`` itself when it can work there (else a ValueError naming the fix),
    or for ``auto`` the fastest that can."""
    if backend not in BACKENDS:
        raise ValueError(f"kv transfer backend {backend!r} is unknown; use one of {BACKENDS}")
    (s_machine, s_dev), (r_machine, r_dev) = _split(sender), _split(receiver)
    cuda = s_dev.startswith("cuda") and r_dev.startswith("cuda")
    same_machine = s_machine == r_machine
    same_gpu = cuda and same_machine and s_dev == r_dev
    if backend == "auto":  # host is not auto on CPU: gloo over loopback is as fast there
        if same_gpu:
            return "cuda_ipc"
        return "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError(
            "kv transfer backend 'nccl' needs CUDA devices at both ends; use 'auto' (or 'gloo')"
        )
    if backend == "nccl" and same_gpu:
        raise ValueError(
            "kv transfer backend 'nccl' cannot join two workers on one GPU (NCCL refuses two "
            "ranks of a communicator on one device); use 'auto', 'cuda_ipc' or 'host'"
        )
    if backend in STAGED and not same_machine:
        raise ValueError(
            f"kv transfer backend {backend!r} needs both ends on one machine; this link joins "
            f"{s_machine} and {r_machine}: use 'auto'"
        )
    if backend == "cuda_ipc" and not same_gpu:
        raise ValueError(
            "kv transfer backend 'cuda_ipc' needs both ends on one GPU; use 'auto' (NCCL "
            "between GPUs, 'host' on CPU)"
        )
    return backend
