"""CUDA paths: skipped without a GPU (run them on a GPU machine with `pytest -m gpu`)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pdserve.engine.tiny_model import make_tiny_model
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.link import RECEIVER, SENDER, KVLink
from pdserve.kv_transfer.peers import device_identity, resolve_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_auto_backend_is_nccl_across_gpus() -> None:
    ends = [device_identity(torch.device(f"cuda:{i}")) for i in (0, 1)]
    assert resolve_backend("auto", *ends) == "nccl"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL links need two GPUs")
def test_nccl_link_moves_kv_between_gpus() -> None:
    store = KVLink.host_store("127.0.0.1")
    header = TransferHeader((TransferItem(1, "r", 4, (0,)),), 2, "bfloat16", 0, 2, 8, 4, True)
    sent = torch.randn(header.layer_shape(), device="cuda:0").bfloat16()
    got: dict[str, object] = {}

    def receiver() -> None:
        torch.cuda.set_device(1)
        link = KVLink.connect(
            "gpu", "nccl", RECEIVER, torch.device("cuda:1"), "127.0.0.1", store.port, store
        )
        got["header"] = link.recv_header()
        buf = torch.empty(header.layer_shape(), device="cuda:1", dtype=torch.bfloat16)
        link.recv_tensor(buf).wait()
        got["data"] = buf.cpu()

    t = threading.Thread(target=receiver)
    t.start()
    torch.cuda.set_device(0)
    link = KVLink.connect("gpu", "nccl", SENDER, torch.device("cuda:0"), "127.0.0.1", store.port)
    link.send_header(header)
    link.send_tensor(sent)
    link.flush()
    t.join(timeout=120)
    assert got["header"] == header
    assert torch.equal(got["data"], sent.cpu())  # type: ignore[arg-type]
    dist.destroy_process_group() if dist.is_initialized() else None


TWO_GPUS = torch.cuda.device_count() >= 2
HALVES = {"prefill_gpus_per_worker": 0.5, "gpus_per_worker": 0.5}  # 1P1D sharing one GPU


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "keywords",
    [
        pytest.param({"mode": "colocated"}, id="colocated-one-gpu"),
        pytest.param(HALVES, id="1p1d-one-gpu"),
        pytest.param(
            {},
            id="1p1d-a-gpu-each",
            marks=pytest.mark.skipif(not TWO_GPUS, reason="a whole GPU per worker needs two"),
        ),
    ],
)
def test_llm_generates_on_cuda(tmp_path: Path, keywords: dict[str, object]) -> None:
    """On one GPU Ray must be able to place every worker (one whole-GPU worker, or two halves):
    asking for more GPUs than there are would wait for them forever."""
    from pdserve.cluster import LLM, SamplingParams

    model = make_tiny_model(tmp_path / "tiny", "llama")
    # one prompt: CUDA graphs at batch 1 only (each captured size costs a flex compile)
    sizes = {"cudagraph_capture_sizes": [1]}
    with LLM(str(model), device="cuda", dtype="float32", **sizes, **keywords) as llm:
        out = llm.generate("hello", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        assert len(out[0].token_ids) == 8
        assert llm.check_integrity() == 0
