"""Draft-model speculation on the tiny models: the proposer's drafts are the draft model's
greedy continuation (its own paged cache caught up across calls and rejections), greedy
decoding through the engine is unchanged by it, a draft equal to the target has every draft
accepted, and the draft cache's blocks are accounted for (room checked, evicted, freed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from _colocated import ColocatedEngine

from pdserve.decode_worker.draft_proposer import DraftModelProposer, build_draft_proposer
from pdserve.decode_worker.runner import DecodeRunner
from pdserve.engine.attention import PrefillMetadata
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.speculative import SpeculativeSettings

BLOCK_SIZE = 4  # small blocks: drafts cross block boundaries, truncation frees blocks
NUM_BLOCKS = 160
CPU = torch.device("cpu")
SPEC = SpeculativeSettings(method="draft", draft_model="x", min_acceptance_rate=0.0)
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=30)


def _load(model_dir: Path) -> CausalLM:
    return load_model(ModelConfig.from_pretrained(str(model_dir)), TPGroup.single())


def _prompts(n: int, seed: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 768, (int(length),), generator=g).tolist() for length in
            torch.randint(3, 40, (n,), generator=g)]  # fmt: skip


def _generate(
    target: CausalLM, prompts: list[list[int]], proposer: DraftModelProposer | None = None
) -> tuple[list[list[int]], ColocatedEngine]:
    cache = allocate_kv_cache(target.config, 1, NUM_BLOCKS, BLOCK_SIZE, CPU)
    engine = ColocatedEngine(
        budget=512,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        max_num_seqs=4,
        max_model_len=600,
        runner=DecodeRunner(target, cache, BLOCK_SIZE, CPU),
        speculative=SPEC if proposer is not None else None,
        proposer=proposer,
    )
    for i, p in enumerate(prompts):
        engine.submit(i, p, params=GREEDY)
    engine.run()
    assert engine.blocks.num_free_blocks == NUM_BLOCKS
    return [engine.outputs[i] for i in range(len(prompts))], engine


def _all_forgotten(proposer: DraftModelProposer) -> None:
    # the engine tells the proposer of every request it drops: no draft KV outlives one
    assert proposer.num_seqs == 0
    assert proposer.blocks.num_free_blocks == proposer.blocks.num_blocks
    proposer.blocks.check_integrity()


def _reference(model: CausalLM, tokens: list[int], k: int) -> list[int]:
    """k greedy tokens by full recomputation without any cache."""
    out = list(tokens)
    for _ in range(k):
        ids = torch.tensor(out)
        meta = PrefillMetadata([len(out)])
        hidden = model(ids, torch.arange(len(out)), meta)
        out.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return out[len(tokens) :]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_drafts_are_the_greedy_continuation_across_rejections(
    arch: str, tiny_models: dict[str, Path]
) -> None:
    # mistral: a 128-token sliding window, run past by the long prompt
    model = _load(tiny_models[arch])
    proposer = DraftModelProposer(model, 200, BLOCK_SIZE, CPU)
    seqs = {0: _prompts(1, seed=5)[0], 1: list(range(6, 150))}
    for rnd in range(4):
        ks = {0: 4, 1: 1 + rnd}
        assert all(proposer.lookahead(s, t, ks[s]) == ks[s] for s, t in seqs.items())
        drafts = proposer.propose([(s, t, ks[s]) for s, t in seqs.items()])
        for (sid, tokens), d in zip(seqs.items(), drafts):
            assert d == _reference(model, tokens, ks[sid]), (rnd, sid)
            # accept one draft and emit another token: part of the draft KV becomes stale
            seqs[sid] = [*tokens, d[0], (d[-1] + 1) % 768]
    proposer.blocks.check_integrity()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_draft_equal_to_target_accepts_every_draft(arch: str, tiny_models: dict[str, Path]) -> None:
    target = _load(tiny_models[arch])
    prompts = [*_prompts(5), list(range(6, 150))]
    plain, _ = _generate(target, prompts)
    proposer = DraftModelProposer(target, NUM_BLOCKS, BLOCK_SIZE, CPU)
    spec, engine = _generate(target, prompts, proposer)
    assert spec == plain
    c = engine.engine.spec_counters
    assert c.verified > 10 and c.acceptance_rate > 0.95
    _all_forgotten(proposer)


def test_one_layer_draft_keeps_greedy_outputs(tiny_models: dict[str, Path]) -> None:
    target = _load(tiny_models["llama"])
    prompts = _prompts(6, seed=7)
    plain, _ = _generate(target, prompts)
    proposer = build_draft_proposer(
        str(tiny_models["llama"]), 1, target, NUM_BLOCKS, BLOCK_SIZE, CPU
    )
    assert len(proposer.model.layers) == proposer.model.config.num_layers == 1
    assert proposer.kv_cache.shape[0] == 1
    spec, engine = _generate(target, prompts, proposer)
    assert spec == plain
    c = engine.engine.spec_counters
    assert c.verified > 10 and 0 < c.accepted < c.proposed  # some drafts rejected
    _all_forgotten(proposer)


def test_lookahead_says_no_when_the_cache_is_too_small(tiny_models: dict[str, Path]) -> None:
    proposer = DraftModelProposer(_load(tiny_models["llama"]), 3, BLOCK_SIZE, CPU)
    assert proposer.lookahead(0, list(range(6, 16)), 4) == 0  # 13 tokens > 12 slots
    assert proposer.lookahead(0, list(range(6, 15)), 4) == 4  # 12 fit
    drafts = proposer.propose([(0, list(range(6, 15)), 4)])
    assert len(drafts[0]) == 4
    # another sequence takes the room: the idle one's draft KV is evicted for it
    assert proposer.lookahead(1, list(range(6, 12)), 2) == 2
    assert 0 not in proposer.blocks and proposer.num_seqs == 1
    # a sequence that lost its room after its lookahead gets no drafts (and no error)
    assert proposer.propose([(0, list(range(6, 15)), 4)]) == [[]]
    proposer.blocks.check_integrity()


def test_build_checks_vocab_and_layers(tiny_models: dict[str, Path]) -> None:
    target = _load(tiny_models["llama"])
    path = str(tiny_models["llama"])
    vocab = target.config.vocab_size
    target.config = dataclasses.replace(target.config, vocab_size=vocab + 1)
    with pytest.raises(ValueError, match=f"vocab_size {vocab} .* {vocab + 1}"):
        build_draft_proposer(path, None, target, 8, BLOCK_SIZE, CPU)
    target.config = dataclasses.replace(target.config, vocab_size=vocab)
    with pytest.raises(ValueError, match="draft_num_layers=3"):
        build_draft_proposer(path, 3, target, 8, BLOCK_SIZE, CPU)
    proposer = build_draft_proposer(path, None, target, 8, BLOCK_SIZE, CPU)
    assert len(proposer.model.layers) == 2 and proposer.model.config.dtype == target.config.dtype
