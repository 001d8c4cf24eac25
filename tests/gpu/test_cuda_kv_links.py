"""KV links on one GPU: two processes sharing cuda:0, as a 1P1D deployment on one GPU places
them. Skipped without CUDA (``make gpu-check`` runs them)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.link import RECEIVER, SENDER, KVLink
from pdserve.kv_transfer.peers import device_identity, resolve_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HOST = "127.0.0.1"
LAYERS, BLOCKS, BLOCK, HEADS, DIM = 4, 40, 16, 2, 64  # a layer: 40 blocks of K and V, 320 KiB


def _layers(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, BLOCKS, 2, BLOCK, HEADS, DIM, generator=g).bfloat16()


def _header() -> TransferHeader:
    item = TransferItem(1, "r", BLOCKS * BLOCK, tuple(range(BLOCKS)))
    return TransferHeader((item,), LAYERS, "bfloat16", 0, HEADS, DIM, BLOCK, False)


def _receiver(backend: str, ring_bytes: int, result: dict) -> None:  # type: ignore[type-arg]
    """The decode end, in its own process (a CUDA IPC handle opens only in another process)."""
    from pdserve.kv_transfer import ring

    ring.RING_BYTES = ring_bytes
    store = KVLink.host_store(HOST)
    result["port"] = store.port
    link = KVLink.connect("g", backend, RECEIVER, torch.device("cuda:0"), HOST, store.port, store)
    result["backend"] = link.backend
    header = link.recv_header()
    got = torch.empty(LAYERS, BLOCKS, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16, device="cuda:0")
    works = [link.recv_tensor(got[i]) for i in range(LAYERS)]
    for w in works:
        w.wait()
    result["header"] = header == _header()
    result["equal"] = torch.equal(got.cpu(), _layers(0))
    link.abort()


def _run(backend: str, ring_bytes: int = 64 << 20) -> dict:  # type: ignore[type-arg]
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    result = manager.dict()
    rx = ctx.Process(target=_receiver, args=(backend, ring_bytes, result))
    rx.start()
    for _ in range(600):
        if "port" in result:
            break
        rx.join(0.1)
    assert "port" in result, "the receiver never listened"
    link = KVLink.connect(
        "g", backend, SENDER, torch.device("cuda:0"), HOST, result["port"], None, 60
    )
    layers = _layers(0).cuda()
    link.send_header(_header())
    for layer in layers:
        link.send_tensor(layer)
    link.flush()
    rx.join(120)
    assert rx.exitcode == 0
    link.abort()
    return dict(result)


def test_auto_picks_cuda_ipc_on_one_gpu() -> None:
    me = device_identity(torch.device("cuda:0"))
    assert resolve_backend("auto", me, me) == "cuda_ipc"
    with pytest.raises(ValueError, match="one GPU"):
        resolve_backend("nccl", me, me)


@pytest.mark.parametrize("backend", ["cuda_ipc", "host"])
def test_two_processes_on_one_gpu_move_kv_exactly(backend: str) -> None:
    result = _run(backend)
    assert result["backend"] == backend
    assert result["header"] and result["equal"]


def test_the_same_gpu_ring_laps_within_a_batch() -> None:
    result = _run("cuda_ipc", ring_bytes=32 * 16 * 1024)  # 16 KiB slots: 20 chunks a layer
    assert result["equal"]
