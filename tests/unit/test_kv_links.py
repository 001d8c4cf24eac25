"""KV links: which backend two ends agree on, the host-staged ring, and links that sit idle.

Real links between threads of this process (each end its own group member, as in two
processes): the staged ring is the same shared-memory file two processes would map.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from pdserve.kv_transfer import link as link_mod
from pdserve.kv_transfer import ring
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.link import RECEIVER, SENDER, KVLink
from pdserve.kv_transfer.peers import device_identity, machine_id, resolve_backend
from pdserve.kv_transfer.receiver import KVReceiver, ReceivedBatch

HOST, CPU = "127.0.0.1", torch.device("cpu")
M, OTHER = "hostA:boot1", "hostB:boot2"


@pytest.mark.parametrize(
    ("configured", "sender", "receiver", "chosen"),
    [
        ("auto", f"{M}/cuda:GPU-1", f"{M}/cuda:GPU-1", "cuda_ipc"),  # fractions of one GPU
        ("auto", f"{M}/cuda:GPU-1", f"{M}/cuda:GPU-2", "nccl"),
        ("auto", f"{M}/cuda:GPU-1", f"{OTHER}/cuda:GPU-1", "nccl"),
        ("auto", f"{M}/cpu", f"{M}/cpu", "gloo"),
        ("auto", f"{M}/cpu", f"{OTHER}/cpu", "gloo"),
        ("host", f"{M}/cuda:GPU-1", f"{M}/cuda:GPU-1", "host"),
        ("gloo", f"{M}/cuda:GPU-1", f"{M}/cuda:GPU-1", "gloo"),
        ("nccl", f"{M}/cuda:GPU-1", f"{OTHER}/cuda:GPU-3", "nccl"),
    ],
)
def test_the_ends_pick_the_backend_that_fits_where_they_are(
    configured: str, sender: str, receiver: str, chosen: str
) -> None:
    assert resolve_backend(configured, sender, receiver) == chosen


@pytest.mark.parametrize(
    ("configured", "sender", "receiver", "fix"),
    [
        ("nccl", f"{M}/cuda:GPU-1", f"{M}/cuda:GPU-1", "one GPU"),
        ("nccl", f"{M}/cpu", f"{OTHER}/cpu", "needs CUDA"),
        ("host", f"{M}/cpu", f"{OTHER}/cpu", "one machine"),
        ("cuda_ipc", f"{M}/cuda:GPU-1", f"{M}/cuda:GPU-2", "one GPU"),
        ("rdma", f"{M}/cpu", f"{M}/cpu", "unknown"),
    ],
)
def test_a_backend_that_cannot_work_there_is_refused_with_the_fix(
    configured: str, sender: str, receiver: str, fix: str
) -> None:
    with pytest.raises(ValueError, match=fix):
        resolve_backend(configured, sender, receiver)


def test_a_cpu_device_is_named_by_this_machine() -> None:
    assert device_identity(CPU) == f"{machine_id()}/cpu"


def _both(receiver: Callable[[], Any], sender: Callable[[], Any]) -> tuple[Any, Any]:
    out: list[Any] = [None, None]

    def call(i: int, fn: Callable[[], Any]) -> None:
        try:
            out[i] = fn()
        except BaseException as e:  # the test inspects it
            out[i] = e

    threads = [threading.Thread(target=call, args=(i, f)) for i, f in enumerate((receiver, sender))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a connect hung"
    return out[0], out[1]


def _pair(backend: str, group_timeout_s: float = 60.0) -> tuple[KVLink, KVLink]:
    store = KVLink.host_store(HOST, timeout_s=20)

    def connect(rank: int) -> KVLink:
        own = store if rank == RECEIVER else None
        return KVLink.connect(
            "t", backend, rank, CPU, HOST, store.port, own, 20, group_timeout_s=group_timeout_s
        )

    rx, tx = _both(lambda: connect(RECEIVER), lambda: connect(SENDER))
    assert isinstance(rx, KVLink) and isinstance(tx, KVLink), (rx, tx)
    return rx, tx


class _Cache:
    """A paged cache fed by a KVReceiver, and a sender of batches into it."""

    LAYERS, BLOCK, HEADS, DIM = 3, 4, 2, 8

    def __init__(self, rx: KVLink, tx: KVLink, blocks: int = 64) -> None:
        shape = (self.LAYERS, blocks, 2, self.BLOCK, self.HEADS, self.DIM)
        self.cache = torch.zeros(shape)
        self.tx = tx
        self.batches: list[ReceivedBatch] = []
        self.errors: list[BaseException] = []
        self.landed = threading.Semaphore(0)
        self.receiver = KVReceiver(
            rx, self.cache, self.BLOCK, lambda item: True, self._on_batch, self._on_error
        )
        self.receiver.start()

    def _on_batch(self, batch: ReceivedBatch) -> None:
        self.batches.append(batch)
        self.landed.release()

    def _on_error(self, name: str, error: BaseException) -> None:
        self.errors.append(error)
        self.landed.release()

    def send(self, tid: int, first_block: int, tokens: int) -> torch.Tensor:
        """One request's KV into blocks ``first_block...``; returns the layers sent."""
        nblocks = -(-tokens // self.BLOCK)
        item = TransferItem(
            tid, f"r{tid}", tokens, tuple(range(first_block, first_block + nblocks))
        )
        header = TransferHeader(
            (item,), self.LAYERS, "float32", 0, self.HEADS, self.DIM, self.BLOCK, True
        )
        layers = torch.randn(self.LAYERS, nblocks, 2, self.BLOCK, self.HEADS, self.DIM)
        self.tx.send_header(header)
        for layer in layers:
            self.tx.send_tensor(layer)
        self.tx.send_tensor(torch.tensor([100 + tid]))
        self.tx.flush()
        assert self.landed.acquire(timeout=30), "the batch never landed"
        assert not self.errors, self.errors
        return layers

    def check(self, layers: torch.Tensor, first_block: int) -> None:
        held = self.cache[:, first_block : first_block + layers.shape[1]]
        assert torch.equal(held, layers)


@pytest.mark.parametrize("backend", ["host", "gloo"])
def test_a_link_moves_batches_into_the_cache_exactly(backend: str) -> None:
    rx, tx = _pair(backend)
    assert rx.backend == tx.backend == backend
    c = _Cache(rx, tx)
    sent = [(c.send(tid, 8 * tid, 5 + 7 * tid), 8 * tid) for tid in range(4)]
    for layers, first in sent:
        c.check(layers, first)
    assert [b.first_tokens for b in c.batches] == [(100,), (101,), (102,), (103,)]
    tx.close()


def test_auto_between_cpu_workers_is_gloo() -> None:
    rx, tx = _pair("auto")
    assert rx.backend == tx.backend == "gloo"
    c = _Cache(rx, tx)
    c.check(c.send(1, 0, 9), 0)
    tx.close()


def test_a_tensor_larger_than_the_ring_goes_through_in_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ring, "RING_BYTES", 8 * 1024)  # 32 slots of 256 bytes
    rx, tx = _pair("host")
    c = _Cache(rx, tx, blocks=80)
    first = c.send(1, 0, 70)  # 18 blocks: 4.6 KiB (18 chunks) a layer: the ring laps
    second = c.send(2, 40, 33)
    c.check(first, 0)
    c.check(second, 40)
    tx.close()


@pytest.mark.parametrize("backend", ["host", "gloo"])
def test_an_idle_link_outlives_its_group_timeout(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle past the group's timeout (and past several idle waits): the next batch still
    lands. Before headers came through the store, the receiver's posted receive failed here
    ("Timed out waiting 1000ms for recv"), as it did after 30 minutes in a deployment."""
    monkeypatch.setattr(link_mod, "IDLE_WAIT_S", 0.3)
    rx, tx = _pair(backend, group_timeout_s=1.0)
    c = _Cache(rx, tx)
    c.check(c.send(1, 0, 6), 0)
    time.sleep(2.5)
    c.check(c.send(2, 8, 6), 8)
    assert not c.errors
    tx.close()


def test_stop_ends_an_idle_receiver_and_abort_of_the_sender_ends_its_peer() -> None:
    for end in ("stop", "abort"):
        rx, tx = _pair("host")
        c = _Cache(rx, tx)
        c.check(c.send(1, 0, 4), 0)
        c.receiver.stop() if end == "stop" else tx.abort()
        c.receiver._thread.join(10)
        assert not c.receiver._thread.is_alive(), end
        assert not c.errors  # an orderly end, not a failure
        tx.abort()


def test_a_backend_that_cannot_work_fails_both_ends_at_once() -> None:
    store = KVLink.host_store(HOST, timeout_s=20)

    def connect(rank: int) -> KVLink:
        own = store if rank == RECEIVER else None
        return KVLink.connect("t", "nccl", rank, CPU, HOST, store.port, own, 20)

    rx, tx = _both(lambda: connect(RECEIVER), lambda: connect(SENDER))
    assert isinstance(tx, ValueError) and "needs CUDA" in str(tx)
    assert isinstance(rx, ValueError) and "needs CUDA" in str(rx)


def test_a_ring_the_sender_cannot_map_fails_both_ends_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(description: bytes, device: torch.device) -> None:
        raise OSError("no such file")

    monkeypatch.setattr(link_mod, "open_ring", refuse)
    # a store timeout far past _both's 60 s: a receiver left waiting for the ring fails the test
    store = KVLink.host_store(HOST, timeout_s=600)

    def connect(rank: int) -> KVLink:
        own = store if rank == RECEIVER else None
        return KVLink.connect("t", "host", rank, CPU, HOST, store.port, own, 600)

    rx, tx = _both(lambda: connect(RECEIVER), lambda: connect(SENDER))
    assert isinstance(tx, OSError)
    assert isinstance(rx, RuntimeError) and "could not map the staging ring" in str(rx)


def test_a_host_ring_leaves_a_full_dev_shm_for_the_temp_folder() -> None:
    assert ring._ring_folder(1 << 20) == ring._SHM_DIR  # room: /dev/shm
    assert ring._ring_folder(1 << 60) != ring._SHM_DIR  # none: the temp folder
