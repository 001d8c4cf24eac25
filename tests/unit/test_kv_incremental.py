"""Incremental KV transfer over a real gloo link: a prefill rank sends each prompt's KV only from
the first block its decode replica does not hold, into exactly the blocks past the cached
prefix; a prompt held whole sends no block, only its first token, and the link stays in step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_kv_quant_wire import BS, CPU, Landing, connect_pair, slots_of

from pdserve.engine.attention import PrefillMetadata
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache, bytes_per_block
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.request import PrefillItem
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.receiver import ReceivedBatch
from pdserve.prefill_worker.runner import PrefillRunner

GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> CausalLM:
    config = ModelConfig.from_pretrained(str(tiny_models["llama"]), dtype="float32")
    return load_model(config, TPGroup.single(), CPU)


def local_prefill(
    model: CausalLM, prompts: list[list[int]], tables: list[tuple[int, ...]]
) -> torch.Tensor:
    """The prompts' whole KV written into a fresh cache at their tables, as decode would."""
    cache = allocate_kv_cache(model.config, 1, 8, BS, "cpu")
    lens = [len(p) for p in prompts]
    slots = torch.cat([slots_of(t, n) for t, n in zip(tables, lens)])
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    model(ids, positions, PrefillMetadata(lens, slots), cache)
    return cache


def test_only_the_blocks_past_the_cached_prefix_travel(model: CausalLM) -> None:
    prompts = [list(range(3, 13)), list(range(20, 28))]  # 10 tokens (3 blocks), 8 (2 blocks)
    tables = [(1, 2, 3), (4, 5)]
    cached = [2, 2]  # the first: its partial third block travels; the second: nothing
    sender, recv_link = connect_pair("incremental")
    landed = allocate_kv_cache(model.config, 1, 8, BS, "cpu")
    landing = Landing(recv_link, landed)
    items = [
        PrefillItem(i, f"r{i}", tuple(p), GREEDY, 0, t, c)
        for i, (p, t, c) in enumerate(zip(prompts, tables, cached))
    ]
    runner = PrefillRunner(model, TPGroup.single(), CPU, BS)
    out, broken = runner.run(items, {0: sender})
    assert not broken and out is not None
    batch = landing.next()
    assert isinstance(batch, ReceivedBatch), batch
    assert batch.header.items == (
        TransferItem(0, "r0", 2, (3,), 2),
        TransferItem(1, "r1", 0, (), 2),
    )
    assert batch.first_tokens == tuple(out.token_ids)
    assert batch.nbytes == bytes_per_block(model.config, 1, BS)  # one block, every layer
    local = local_prefill(model, prompts, tables)
    assert torch.equal(landed[:, 3], local[:, 3])  # the sent block is what decode computes
    assert not landed[:, [0, 1, 2, 4, 5, 6, 7]].any()  # the cached ones were not written

    # a batch whose every prompt is cached whole: headers and the trailer only, and the
    # link carries the next batch as before
    out2, broken = runner.run(items[1:], {0: sender})
    batch = landing.next()
    assert isinstance(batch, ReceivedBatch) and not broken and out2 is not None
    assert batch.header.wire_layers == 0 and batch.nbytes == 0
    assert batch.first_tokens == tuple(out2.token_ids) == tuple(out.token_ids[1:])
    runner.run([PrefillItem(2, "r2", tuple(prompts[1]), GREEDY, 0, (6, 7))], {0: sender})
    batch = landing.next()
    assert isinstance(batch, ReceivedBatch) and batch.header.items[0].block_ids == (6, 7)
    assert torch.equal(landed[:, 6:8], local[:, 4:6])  # the same prompt, sent whole
    sender.close()


def test_the_header_carries_each_items_first_block() -> None:
    items = (TransferItem(1, "a", 5, (7, 8), 3), TransferItem(2, "b", 0, (), 2))
    header = TransferHeader(items, 4, "float32", 0, 2, 8, BS, True)
    back = TransferHeader.decode(header.encode())
    assert back == header and back.num_blocks == 2 and back.wire_layers == 4
    nothing = TransferHeader(items[1:], 4, "float32", 0, 2, 8, BS, True)
    assert nothing.num_blocks == 0 and nothing.wire_layers == 0
