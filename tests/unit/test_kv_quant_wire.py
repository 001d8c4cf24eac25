"""The compressed KV on the wire: a prefill rank quantizes as the decode cache does, so what
lands (in place or staged and scattered, whole or a head slice) is bit for bit what a local write
stores, over a real gloo link too; a receiver whose cache holds another format fails the link
with a message naming both."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest
import torch

from pdserve.engine.attention import PrefillMetadata, write_kv
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache, bytes_per_block, kv_rows
from pdserve.engine.kv_quant import TORCH_DTYPES, movable, to_cache_rows
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup
from pdserve.engine.request import PrefillItem
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.descriptor import (
    PROTOCOL_VERSION,
    TransferHeader,
    TransferItem,
    TransferProtocolError,
)
from pdserve.kv_transfer.layout import (
    pack_layer,
    run_start,
    token_ranges,
    wire_blocks,
    wire_plan,
    write_layer,
)
from pdserve.kv_transfer.link import RECEIVER, SENDER, KVLink
from pdserve.kv_transfer.receiver import KVReceiver, ReceivedBatch
from pdserve.prefill_worker.runner import PrefillRunner

BS = 4
CPU = torch.device("cpu")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(movable(a), movable(b))


def slots_of(table: tuple[int, ...], n: int) -> torch.Tensor:
    pos = torch.arange(n)
    return torch.tensor(table)[pos // BS] * BS + pos % BS


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "bfloat16"])
@pytest.mark.parametrize("landing", ["in place", "scattered", "head slice"])
def test_the_wire_lands_what_a_local_write_stores(name: str, landing: str) -> None:
    dtype = TORCH_DTYPES[name]
    lens = [5, 8, 3]
    qkv = torch.randn(sum(lens), 3, 4, 16)  # the forward's fused output: k, v strided views
    k, v = qkv[:, 1], qkv[:, 2]
    tables = [(2, 3), (4, 5), (6,)] if landing != "scattered" else [(5, 2), (0, 6), (3,)]
    heads = (0, 4) if landing != "head slice" else (2, 4)  # a TP rank's slice lands at offset 2
    local = torch.zeros(8, 2, BS, 4, 16 + (2 if name != "bfloat16" else 0), dtype=dtype)
    landed = torch.zeros_like(local)
    for (s, e), table in zip(token_ranges(lens), tables):
        write_kv(local, k[s:e], v[s:e], kv_rows(slots_of(table, e - s), BS))
    # the prefill rank's side: its heads only, quantized once, packed per destination
    ks, vs = (to_cache_rows(x[:, heads[0] : heads[1]], dtype) for x in (k, v))
    wire = pack_layer(ks, vs, wire_plan(token_ranges(lens), BS))
    assert wire.dtype == dtype and wire.shape[-1] == local.shape[-1]
    items = [TransferItem(i, f"r{i}", n, t) for i, (n, t) in enumerate(zip(lens, tables))]
    start = run_start(items, BS)
    if landing == "in place":
        assert start == 2
        movable(landed[start : start + wire.shape[0]]).copy_(movable(wire))  # the receive
    else:
        write_layer(landed, wire, wire_blocks(items, BS)[0], heads[0])
    h = slice(heads[0], heads[1])
    assert same_bytes(landed[:, :, :, h], local[:, :, :, h])
    assert not movable(landed[:, :, :, : heads[0]]).any()  # other heads untouched


def connect_pair(name: str) -> tuple[KVLink, KVLink]:
    store = KVLink.host_store("127.0.0.1", timeout_s=60)
    links: dict[int, KVLink] = {}

    def join(rank: int) -> None:
        host_store = store if rank == RECEIVER else None
        links[rank] = KVLink.connect(
            name, "gloo", rank, CPU, "127.0.0.1", store.port, host_store, timeout_s=60
        )

    threads = [threading.Thread(target=join, args=(r,)) for r in (SENDER, RECEIVER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return links[SENDER], links[RECEIVER]


class Landing:
    """A KVReceiver on its own thread: what it reports, and what it asked to accept."""

    def __init__(self, link: KVLink, cache: torch.Tensor) -> None:
        self.batches: queue.Queue[ReceivedBatch | BaseException] = queue.Queue()
        self.asked: list[int] = []

        def accept(item: TransferItem) -> bool:
            self.asked.append(item.transfer_id)
            return True

        self.receiver = KVReceiver(
            link, cache, BS, accept, self.batches.put, lambda _, e: self.batches.put(e)
        )
        self.receiver.start()

    def next(self) -> ReceivedBatch | BaseException:
        return self.batches.get(timeout=60)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("scattered", [False, True])
def test_a_sent_prompt_lands_as_a_local_prefill_writes_it(
    tiny_models: dict[str, Path], name: str, scattered: bool
) -> None:
    config = ModelConfig.from_pretrained(str(tiny_models["llama"]), dtype="float32")
    model = load_model(config, TPGroup.single(), CPU)
    prompts = [list(range(3, 12)), list(range(20, 26))]  # 9 and 6 tokens: 3 + 2 blocks
    tables = [(1, 2, 3), (4, 5)] if not scattered else [(6, 1, 3), (0, 4)]
    sender, recv_link = connect_pair(f"wire-{name}-{scattered}")
    landed = allocate_kv_cache(config, 1, 8, BS, "cpu", name)
    landing = Landing(recv_link, landed)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    items = [
        PrefillItem(i, f"r{i}", tuple(p), greedy, 0, t)
        for i, (p, t) in enumerate(zip(prompts, tables))
    ]
    runner = PrefillRunner(model, TPGroup.single(), CPU, BS, name)
    out, broken = runner.run(items, {0: sender})
    assert not broken and out is not None
    batch = landing.next()
    assert isinstance(batch, ReceivedBatch), batch
    assert batch.header.dtype == name and batch.first_tokens == tuple(out.token_ids)
    assert batch.nbytes == 5 * bytes_per_block(config, 1, BS, name)  # codes and scales
    # the same prompts prefilled into a local cache of the same format
    local = allocate_kv_cache(config, 1, 8, BS, "cpu", name)
    lens = [len(p) for p in prompts]
    slots = torch.cat([slots_of(t, n) for t, n in zip(tables, lens)])
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    model(ids, positions, PrefillMetadata(lens, slots), local)
    assert same_bytes(landed, local)
    # one ascending run lands straight in the cache: the staging arena is never grown
    assert (landing.receiver._arena.numel() == 0) is not scattered
    sender.close()


def test_a_receiver_fails_the_link_on_another_kv_dtype() -> None:
    """A float32 sender (another version, another config) and an int8 cache: the batch is
    drained, so the sender is not left waiting, and the link fails naming both formats."""
    sender, recv_link = connect_pair("wire-mismatch")
    cache = torch.zeros(2, 4, 2, BS, 1, 8 + 2, dtype=torch.int8)
    landing = Landing(recv_link, cache)
    header = TransferHeader((TransferItem(7, "r7", 5, (0, 1)),), 2, "float32", 0, 1, 8, BS, True)
    sender.send_header(header)
    for _ in range(2):
        sender.send_tensor(torch.randn(header.layer_shape()))
    sender.send_tensor(torch.tensor([1]))
    sender.flush()  # returns: the receiver drained the batch
    error = landing.next()
    assert isinstance(error, ValueError)
    message = str(error)
    assert "float32" in message and "int8" in message and "decode.kv_cache.dtype" in message
    assert landing.asked == [7]  # accepted first, so the decode side fails it with the message
    assert not cache.any()


def test_the_header_carries_the_kv_format() -> None:
    header = TransferHeader((TransferItem(1, "a", 5, (3, 4)),), 30, "int8", 0, 3, 64, 16, False)
    back = TransferHeader.decode(header.encode())
    assert back == header and back.layer_shape() == (1, 2, 16, 3, 66)
    assert back.layer_bytes() == 2 * 16 * 3 * 66
    assert PROTOCOL_VERSION == 5
    with pytest.raises(TransferProtocolError, match="unknown KV dtype"):
        TransferHeader.decode(header.encode().replace(b"int8", b"int9"))
