"""A prefill rank's paged cache over a real gloo link: a chunked prompt's KV lands in decode's
blocks part by part, a cached prefix is read from the prefill cache instead of computed, and
either way decode holds what a whole local prefill computes and the first token is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_kv_incremental import GREEDY
from test_kv_quant_wire import BS, CPU, Landing, connect_pair, slots_of

from pdserve.engine.attention import PrefillMetadata
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.request import PrefillItem
from pdserve.kv_transfer.receiver import ReceivedBatch
from pdserve.prefill_worker.runner import PrefillRunner
from pdserve.prefill_worker.scheduler import PrefillScheduler


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> CausalLM:
    config = ModelConfig.from_pretrained(str(tiny_models["llama"]), dtype="float32")
    return load_model(config, TPGroup.single(), CPU)


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def local_prefill(model: CausalLM, tokens: list[int], table: tuple[int, ...]) -> torch.Tensor:
    """The prompt's whole KV written into a fresh cache at its table, as decode would."""
    cache = allocate_kv_cache(model.config, 1, 32, BS, "cpu")
    n = len(tokens)
    meta = PrefillMetadata([n], slots_of(table, n))
    model(torch.tensor(tokens), torch.arange(n), meta, cache)
    return cache


def first_token(model: CausalLM, tokens: list[int]) -> int:
    """The cache-free runner's first token (no link: it only samples)."""
    out, _ = PrefillRunner(model, TPGroup.single(), CPU, BS).run(
        [PrefillItem(99, "ref", tuple(tokens), GREEDY, 5, ())], {}
    )
    assert out is not None
    return out.token_ids[0]


class Pool:
    """One prefill rank (TP 1) and its scheduler, sending to one decode cache over gloo."""

    def __init__(self, model: CausalLM, budget: int, chunked: bool, caching: bool) -> None:
        self.runner = PrefillRunner(model, TPGroup.single(), CPU, BS, num_blocks=32)
        self.sched = PrefillScheduler(32, BS, budget, 8, chunked, caching, salt=3)
        self.sender, link = connect_pair(f"pool{budget}{chunked}{caching}")
        self.decode = allocate_kv_cache(model.config, 1, 32, BS, "cpu")
        self.landing = Landing(link, self.decode)
        self.batches: list[ReceivedBatch] = []

    def prefill(self, items: list[PrefillItem]) -> dict[int, int]:
        """Run steps until every item is done; each one's first token."""
        for it in items:
            self.sched.add(it)
        firsts: dict[int, int] = {}
        while works := self.sched.schedule():
            out, broken = self.runner.run_step(works, {0: self.sender})
            assert not broken
            self.sched.on_step_done(works)
            self.sched.check_integrity()
            firsts |= {tid: token for tid, (token, _) in out.items()}
            if any(w.sends for w in works):
                batch = self.landing.next()
                assert isinstance(batch, ReceivedBatch), batch
                self.batches.append(batch)
        return firsts


def test_a_chunked_prompt_lands_part_by_part_as_a_whole_prefill_would(model: CausalLM) -> None:
    tokens = prompt(0, 22)  # 6 blocks of 4; chunks of 8 tokens: 3 parts
    table = tuple(range(10, 16))
    pool = Pool(model, budget=8, chunked=True, caching=False)
    firsts = pool.prefill([PrefillItem(1, "r1", tuple(tokens), GREEDY, 0, table)])
    parts = [b.header.items[0] for b in pool.batches]
    assert [(p.first_block, p.block_ids, p.num_tokens, p.last) for p in parts] == [
        (0, (10, 11), 8, False),
        (2, (12, 13), 8, False),
        (4, (14, 15), 6, True),
    ]
    assert [b.first_tokens for b in pool.batches] == [None, None, (firsts[1],)]
    assert firsts[1] == first_token(model, tokens)
    local = local_prefill(model, tokens, table)
    torch.testing.assert_close(pool.decode[:, 10:16], local[:, 10:16], rtol=1e-5, atol=1e-5)
    # the unused tail of the last block arrives as zeros
    assert not pool.decode[:, 15, :, 2:].any()
    pool.sender.close()


def test_a_prefix_cached_on_prefill_is_read_from_its_cache_not_computed(model: CausalLM) -> None:
    shared = prompt(1, 16)
    first, second = [*shared, *prompt(2, 5)], [*shared, *prompt(3, 7)]
    pool = Pool(model, budget=64, chunked=False, caching=True)
    pool.prefill([PrefillItem(1, "r1", tuple(first), GREEDY, 0, tuple(range(6)))])
    # decode holds the first block only: the next three come from the prefill cache
    table = tuple(range(20, 26))
    firsts = pool.prefill([PrefillItem(2, "r2", tuple(second), GREEDY, 0, table, 1)])
    assert (pool.sched.queries, pool.sched.hits) == (21 + 23, 16)
    part = pool.batches[-1].header.items[0]
    assert (part.first_block, part.block_ids, part.num_tokens) == (1, table[1:], 19)
    assert firsts[2] == first_token(model, second)
    local = local_prefill(model, second, table)
    torch.testing.assert_close(pool.decode[:, 21:26], local[:, 21:26], rtol=1e-5, atol=1e-5)
    assert not pool.decode[:, 20].any()  # decode's own block was not sent
    assert pool.sched.check_integrity() == 0
    pool.sender.close()
