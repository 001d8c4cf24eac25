"""Speculative decoding in the decode engine, in process on the tiny models: verification in the
decode step (k + 1 queries per sequence over the paged cache, beside sequences that do not
speculate), rollback of rejected slots, and outputs equal to non-speculative decoding: token for
token when greedy or seeded, in distribution when not; and the spec bench run end to end. The
n-gram proposer and the acceptance rule alone are test_speculative_rules.py's."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from _colocated import ColocatedEngine

from pdserve.decode_worker.runner import DecodeRunner
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup
from pdserve.engine.sampling import Sampler
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.speculative import SpeculativeSettings
from pdserve.engine.tiny_model import TINY_ARCHS

BLOCK_SIZE = 4  # small blocks: drafts cross block boundaries and rejected ones free blocks
NUM_BLOCKS = 160


# -- verification in the engine ------------------------------------------------------------


class OracleProposer:
    """Drafts from a known continuation, corrupted at random: every acceptance length occurs
    (a fake collaborator: the proposer is not what these tests check, the verification is)."""

    def __init__(
        self,
        futures: dict[int, list[int]],
        prompt_lens: dict[int, int],
        seed: int,
        corrupt: float = 0.25,
    ) -> None:
        self.futures, self.prompt_lens, self.corrupt = futures, prompt_lens, corrupt
        self.rng = random.Random(seed)

    def lookahead(self, seq_id: int, token_ids: Sequence[int], k: int) -> int:
        return k if self.rng.random() < 0.8 else 0  # some sequences do not speculate

    def propose(self, wanted: Sequence[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        out = []
        for seq_id, tokens, k in wanted:
            done = len(tokens) - self.prompt_lens[seq_id]
            drafts = list(self.futures[seq_id][done : done + k])
            for i in range(len(drafts)):
                if self.rng.random() < self.corrupt:
                    drafts[i] = self.rng.randrange(6, 768)
            out.append(drafts)
        return out

    def forget(self, seq_id: int) -> None:
        pass


def _runner(
    model_dir: Path, sampler_seed: int | None = None, num_blocks: int = NUM_BLOCKS
) -> tuple[DecodeRunner, int]:
    config = ModelConfig.from_pretrained(str(model_dir))
    cache = allocate_kv_cache(config, 1, num_blocks, BLOCK_SIZE, "cpu")
    runner = DecodeRunner(
        load_model(config, TPGroup.single()), cache, BLOCK_SIZE, torch.device("cpu")
    )
    if sampler_seed is not None:
        runner.sampler = Sampler(seed=sampler_seed)
    return runner, config.vocab_size


def _generate(
    model_dir: Path,
    prompts: list[list[int]],
    params: SamplingParams,
    speculative: SpeculativeSettings | None = None,
    futures: dict[int, list[int]] | None = None,
    sampler_seed: int | None = None,
    max_num_seqs: int = 4,
    num_blocks: int = NUM_BLOCKS,
    corrupt: float = 0.25,
) -> tuple[list[list[int]], ColocatedEngine]:
    runner, _ = _runner(model_dir, sampler_seed, num_blocks)
    proposer = None
    if futures is not None:
        lens = {i: len(p) for i, p in enumerate(prompts)}
        proposer = OracleProposer(futures, lens, seed=3, corrupt=corrupt)
    engine = ColocatedEngine(
        budget=512,
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        max_num_seqs=max_num_seqs,
        max_model_len=min(num_blocks * BLOCK_SIZE, 600),
        runner=runner,
        speculative=speculative,
        proposer=proposer,
    )
    for i, p in enumerate(prompts):
        engine.submit(i, p, params=params)
    engine.run()
    assert engine.blocks.num_free_blocks == num_blocks  # every rejected slot was given back
    engine.engine.check_integrity()
    return [engine.outputs[i] for i in range(len(prompts))], engine


def _prompts(n: int, seed: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 768, (int(length),), generator=g).tolist() for length in
            torch.randint(3, 40, (n,), generator=g)]  # fmt: skip


SPEC = SpeculativeSettings(num_speculative_tokens=4, min_acceptance_rate=0.0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_speculation_equals_plain_decoding(arch: str, tiny_models: dict[str, Path]) -> None:
    # mistral's 128-token sliding window: prompts and outputs run past it
    prompts = [*_prompts(6), list(range(6, 150))]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=40)
    plain, _ = _generate(tiny_models[arch], prompts, params)
    futures = dict(enumerate(plain))
    spec, engine = _generate(tiny_models[arch], prompts, params, SPEC, futures)
    assert spec == plain
    c = engine.engine.spec_counters
    # the oracle's corrupted drafts: some accepted, some rejected
    assert c.verified > 20 and 0 < c.accepted < c.proposed


def test_seeded_sampling_with_penalties_is_token_identical(tiny_models: dict[str, Path]) -> None:
    # a seeded draw depends on (seed, output index) and its logits only, so a verified token is
    # the token plain decoding would draw; penalties and logprobs see the drafts before them
    prompts = _prompts(5, seed=7)
    params = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, seed=11, max_tokens=30, ignore_eos=True,
        presence_penalty=0.5, repetition_penalty=1.2, logit_bias=((100, 2.0),), min_tokens=5,
        logprobs=2,
    )  # fmt: skip
    plain, base = _generate(tiny_models["qwen3"], prompts, params)
    spec, engine = _generate(tiny_models["qwen3"], prompts, params, SPEC, dict(enumerate(plain)))
    assert spec == plain
    assert engine.engine.spec_counters.accepted > 0
    # each emitted token carries its own logprobs, as plain decoding reports them
    for tid in range(len(prompts)):
        ours, theirs = engine.logprobs[tid], base.logprobs[tid]
        assert [lp.token_id for lp in ours] == [lp.token_id for lp in theirs] == spec[tid]
        assert [lp.logprob for lp in ours] == pytest.approx([lp.logprob for lp in theirs], abs=1e-4)
        assert [[t for t, _ in lp.top] for lp in ours] == [[t for t, _ in lp.top] for lp in theirs]


def test_preemption_and_stops_compose_with_speculation(tiny_models: dict[str, Path]) -> None:
    # a cache too small for every output: sequences are preempted and recomputed mid-speculation
    prompts = _prompts(8, seed=9)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=48)
    plain, _ = _generate(tiny_models["llama"], prompts, params)
    futures = dict(enumerate(plain))
    runner, _ = _runner(tiny_models["llama"])
    engine = ColocatedEngine(
        budget=512, num_blocks=60, block_size=BLOCK_SIZE, max_num_seqs=8, max_model_len=200,
        runner=runner, speculative=SPEC,
        proposer=OracleProposer(futures, {i: len(p) for i, p in enumerate(prompts)}, seed=5),
    )  # fmt: skip
    # a stop token mid-draft: the sequence ends at it, later accepted drafts are not emitted
    stop_at = plain[0][10]
    for i, p in enumerate(prompts):
        sp = params if i else SamplingParams(temperature=0.0, max_tokens=48,
                                             stop_token_ids=(stop_at,), ignore_eos=True)  # fmt: skip
        engine.submit(i, p, params=sp)
    engine.run()
    assert engine.preemptions > 0
    assert engine.outputs[0] == plain[0][: plain[0].index(stop_at) + 1]
    assert [engine.outputs[i] for i in range(1, 8)] == plain[1:]
    assert engine.blocks.num_free_blocks == 60


def _chi_square_p(a: Counter[int], b: Counter[int]) -> float:
    """Two-sample chi-square test of homogeneity: the p-value that a and b share a law."""
    keys = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for k in keys:
        total = a[k] + b[k]
        for count, n in ((a[k], na), (b[k], nb)):
            expected = total * n / (na + nb)
            stat += (count - expected) ** 2 / expected
    df = len(keys) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))


def test_sampled_speculation_matches_the_plain_distribution(tiny_models: dict[str, Path]) -> None:
    # a small vocabulary: top_k=4 leaves 4 candidates a position; drafts are the greedy path
    # (each accepted with its probability); unseeded draws from fixed sampler seeds
    n = 600
    prompt = _prompts(1, seed=13)[0][:8]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4)
    path = _generate(tiny_models["llama"], [prompt], greedy)[0][0]
    params = SamplingParams(temperature=0.25, top_k=4, max_tokens=4, ignore_eos=True)
    prompts = [prompt] * n
    futures = dict.fromkeys(range(n), path)
    big = {"max_num_seqs": 64, "num_blocks": 2048}
    plain, _ = _generate(tiny_models["llama"], prompts, params, sampler_seed=1, **big)
    spec, engine = _generate(
        tiny_models["llama"], prompts, params, SpeculativeSettings(num_speculative_tokens=3,
        min_acceptance_rate=0.0), futures, sampler_seed=2, corrupt=0.0, **big,
    )  # fmt: skip
    c = engine.engine.spec_counters
    assert min(c.accepted, c.proposed - c.accepted) > 200  # drafts both accepted and rejected
    for pos in range(1, 4):  # token 0 comes from the prefill, before any speculation
        p = _chi_square_p(Counter(o[pos] for o in plain), Counter(o[pos] for o in spec))
        assert p > 1e-3, (pos, p)
    joint = _chi_square_p(
        Counter(tuple(o[1:3]) for o in plain), Counter(tuple(o[1:3]) for o in spec)
    )
    assert joint > 1e-3


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_the_spec_bench_runs_both_ways_and_reports(
    method: str, tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from pdserve.bench.micro.spec_bench import main

    out = tmp_path / "spec.json"
    argv = ["--model", str(tiny_models["llama"]), "--dtype", "float32", "--batch-sizes", "1,4",
            "--temperatures", "0,0.8", "--new-tokens", "6", "--repeats", "1", "--warmup", "0",
            "--method", method, "--draft-layers", "1", "--out", str(out)]  # fmt: skip
    assert main(argv if method == "draft" else argv[:-6] + argv[-2:]) == 0
    figures = json.loads(out.read_text())["figures"]
    assert len(figures) == 2 * 2 * 2  # workloads x temperatures x batch sizes
    # the same tokens with and without speculation: greedy, and seeded when sampled
    assert all(f["same_outputs"] and f["tokens"] == 4 * 5 for f in figures)
    assert "speed-up" in capsys.readouterr().out


def test_cancellation_mid_speculation_frees_every_block(tiny_models: dict[str, Path]) -> None:
    # an abort between steps, and one while the sequence is in the planned step (it takes
    # effect at the commit): the drafts' slots go with the rest
    prompts = _prompts(4, seed=21)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=40)
    plain, _ = _generate(tiny_models["llama"], prompts, params)
    runner, _ = _runner(tiny_models["llama"])
    c = ColocatedEngine(
        budget=512, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=4,
        max_model_len=400, runner=runner, speculative=SPEC,
        proposer=OracleProposer(dict(enumerate(plain)), {i: len(p) for i, p in enumerate(prompts)},
                                seed=1, corrupt=0.0),
    )  # fmt: skip
    for i, p in enumerate(prompts):
        c.submit(i, p, params=params)
    for _ in range(3):
        c.step()
    c.abort(0)  # between steps
    engine = c.engine
    step = engine.plan()
    assert step is not None and step.drafts, "the oracle proposes for every sequence"
    engine.abort(1, kv_pending=False)  # in the planned step: deferred to its commit
    assert engine.runner is not None
    for tid, delta in engine.commit(step, engine.runner.run(engine.prepare(step))):
        c.outputs[tid] += delta.token_ids
    c.run()
    assert c.outputs[2] == plain[2] and c.outputs[3] == plain[3]
    assert c.blocks.num_free_blocks == NUM_BLOCKS
    engine.check_integrity()
