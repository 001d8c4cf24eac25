"""Engine benchmark: pdserve's decode and prefill against transformers, same model, same prompts.

Each measurement is one timed call returning seconds (and, for decode, the generated tokens).
Definitions, identical on both sides:

- decode tokens/s = B * (new_tokens - 1) / seconds from the moment the first token (sampled
  from the prefill logits) exists to the moment the last one does: the time of new_tokens - 1
  decode steps, greedy, EOS ignored. Prefill time is excluded on both sides.
- prefill tokens/s = B * prompt_len / seconds of one forward pass over the batch plus the
  logits of each sequence's last position (no KV cache kept).
"""

from __future__ import annotations

import logging
import math
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from pdserve.decode_worker.runner import DecodeRunner
from pdserve.decode_worker.scheduler import DecodeScheduler, DecodeSeq
from pdserve.engine.attention import PrefillMetadata
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.kv_cache import allocate_kv_cache
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.request import PrefillItem
from pdserve.engine.sampling import SamplingRow
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.link import RECEIVER, SENDER, KVLink
from pdserve.kv_transfer.receiver import KVReceiver, ReceivedBatch
from pdserve.prefill_worker.runner import PrefillRunner
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.configuration_utils import ContinuousBatchingConfig

CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


@dataclass
class DecodeRun:
    """One timed decode: seconds of the decode steps and each sequence's generated tokens."""

    seconds: float
    tokens: list[list[int]]  # [B][new_tokens], the prefill's first token included
    counted: int  # tokens generated inside the timed window


def make_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """B random prompts of prompt_len ids, avoiding the low ids where special tokens live."""
    g = torch.Generator().manual_seed(seed)
    low = min(8, vocab_size - 1)
    return torch.randint(low, vocab_size, (batch, prompt_len), generator=g).tolist()


def _packed(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    # input_ids, positions: [sum(lens)]; prompts back to back, each from position 0
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    return ids, positions, lens


def _last_positions(lens: list[int]) -> torch.Tensor:
    return torch.tensor(lens).cumsum(0) - 1


# ---- pdserve ---------------------------------------------------------------------------------


@torch.inference_mode()
def pdserve_prefill(model: CausalLM, prompts: list[list[int]]) -> float:
    """Seconds of CausalLM over the packed batch (no cache write) + last-position logits."""
    ids, positions, lens = _packed(prompts)
    start = time.perf_counter()
    hidden = model(ids, positions, PrefillMetadata(lens))
    model.compute_logits(hidden.index_select(0, _last_positions(lens))).argmax(-1)
    return time.perf_counter() - start


def _admit(
    scheduler: DecodeScheduler, runner: DecodeRunner, prompts: list[list[int]], max_tokens: int
) -> list[DecodeSeq]:
    """What a decode replica sees after a transfer: prompt K/V in reserved blocks, first token."""
    seqs = []
    slots: list[int] = []
    bs = runner.block_size
    for i, prompt in enumerate(prompts):
        table = scheduler.reserve(i, len(prompt))
        assert table is not None, "the benchmark sizes the cache for every sequence"
        slots += [table[p // bs] * bs + p % bs for p in range(len(prompt))]
    ids, positions, lens = _packed(prompts)
    with torch.inference_mode():
        meta = PrefillMetadata(lens, torch.tensor(slots))
        hidden = runner.model(ids, positions, meta, runner.kv_cache)
        first = runner.model.compute_logits(hidden[_last_positions(lens)]).argmax(-1).tolist()
    for i, (prompt, token) in enumerate(zip(prompts, first, strict=True)):
        seqs.append(DecodeSeq(i, len(prompt), max_tokens, [*prompt, token]))
        scheduler.activate(seqs[-1])
    return seqs


def _decode_step(scheduler: DecodeScheduler, runner: DecodeRunner) -> int:
    """One step as the decode worker runs it; returns the number of tokens generated."""
    out = scheduler.schedule()
    assert not out.recompute and not out.preempted, "the cache holds every sequence"
    table = scheduler.blocks.block_table
    rows = [
        SamplingRow(GREEDY, s.token_ids[: s.prompt_len], s.token_ids[s.prompt_len :])
        for s in out.decode
    ]
    result = runner.step(out.decode, [table(s.seq_id) for s in out.decode], rows)
    scheduler.on_step_done(out.decode)
    for seq, token in zip(out.decode, result.token_ids, strict=True):
        seq.token_ids.append(token)
        if scheduler.reached_length_limit(seq):
            scheduler.finish(seq.seq_id)
    return len(out.decode)


def pdserve_decode(
    model: CausalLM, prompts: list[list[int]], new_tokens: int, block_size: int
) -> DecodeRun:
    """Prefill into a paged cache, then time BlockManager + DecodeScheduler + DecodeRunner
    steps until every sequence has new_tokens tokens."""
    max_len = max(len(p) for p in prompts) + new_tokens
    blocks = BlockManager(len(prompts) * math.ceil(max_len / block_size), block_size)
    scheduler = DecodeScheduler(blocks, max_num_seqs=len(prompts), max_model_len=max_len)
    kv_cache = allocate_kv_cache(model.config, 1, blocks.num_blocks, block_size, CPU)
    runner = DecodeRunner(model, kv_cache, block_size, CPU)
    seqs = _admit(scheduler, runner, prompts, new_tokens)
    counted = 0
    start = time.perf_counter()
    while scheduler.num_running or scheduler.num_waiting:
        counted += _decode_step(scheduler, runner)
    seconds = time.perf_counter() - start
    blocks.check_integrity()
    return DecodeRun(seconds, [s.token_ids[s.prompt_len :] for s in seqs], counted)


class KVSendBench:
    """PrefillRunner sending every layer's K/V over a real gloo KVLink to a KVReceiver thread of
    this process, which scatters it into a paged cache. Timed until the receiver reports the
    batch written (KV landed), so the number includes the whole transfer."""

    def __init__(self, model: CausalLM, max_batch: int, prompt_len: int, block_size: int) -> None:
        store = KVLink.host_store("127.0.0.1")
        with ThreadPoolExecutor(1) as pool:  # both ranks must join at once
            peer = pool.submit(
                KVLink.connect, "bench", "gloo", RECEIVER, CPU, "127.0.0.1", store.port, store
            )
            self.sender = KVLink.connect("bench", "gloo", SENDER, CPU, "127.0.0.1", store.port)
            receiving = peer.result()
        per_seq = math.ceil(prompt_len / block_size)
        self.blocks = BlockManager(max_batch * per_seq, block_size)
        cache = allocate_kv_cache(model.config, 1, self.blocks.num_blocks, block_size, CPU)
        self._landed: queue.Queue[ReceivedBatch | BaseException] = queue.Queue()
        self.receiver = KVReceiver(
            receiving,
            cache,
            block_size,
            lambda _: True,
            self._landed.put,
            lambda _, e: self._landed.put(e),
        )
        self.receiver.start()
        self.runner = PrefillRunner(model, TPGroup.single(), CPU)

    def run(self, prompts: list[list[int]]) -> float:
        """Seconds from the start of the prefill until all K/V is in the receiver's cache."""
        for owner in self.blocks.owners():
            self.blocks.free(owner)
        items = [
            PrefillItem(
                i, f"bench-{i}", tuple(p), GREEDY, 0, tuple(self.blocks.allocate(i, len(p)))
            )
            for i, p in enumerate(prompts)
        ]
        start = time.perf_counter()
        self.runner.run(items, {0: self.sender})
        landed = self._landed.get(timeout=600)
        seconds = time.perf_counter() - start
        if isinstance(landed, BaseException):
            raise RuntimeError(f"KV transfer failed during the benchmark: {landed}") from landed
        return seconds

    def close(self) -> None:
        self.sender.close()  # the receiver thread sees the closing header and ends


# ---- transformers ------------------------------------------------------------------------------


class _TokenClock(StoppingCriteria):
    """Never stops; records when each new token exists (generate calls it after every token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object
    ) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.inference_mode()
def hf_prefill(hf: PreTrainedModel, prompts: list[list[int]]) -> float:
    """Seconds of a plain forward on the [B, prompt_len] batch, last-position logits only."""
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    hf(input_ids=ids, use_cache=False, logits_to_keep=1).logits.argmax(-1)
    return time.perf_counter() - start


@torch.inference_mode()
def hf_generate(hf: PreTrainedModel, prompts: list[list[int]], new_tokens: int) -> DecodeRun:
    """`generate` with the prompts as one static batch (equal lengths: no padding)."""
    ids = torch.tensor(prompts)
    clock = _TokenClock()
    out = hf.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        stopping_criteria=StoppingCriteriaList([clock]),
        pad_token_id=0,
    )
    assert len(clock.times) == new_tokens, len(clock.times)
    tokens = out[:, ids.shape[1] :].tolist()
    return DecodeRun(clock.times[-1] - clock.times[0], tokens, len(prompts) * (new_tokens - 1))


def hf_generate_batch(hf: PreTrainedModel, prompts: list[list[int]], new_tokens: int) -> DecodeRun:
    """transformers' continuous batching. Window: from the moment every sequence has its first
    token to the last token; counts the tokens generated inside it (all of them after the
    first when the prefills run together, as here: the token budget fits the whole batch)."""
    b, n = len(prompts), max(len(p) for p in prompts)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
    )
    cb = ContinuousBatchingConfig(
        num_blocks=b * math.ceil((n + new_tokens) / 256) + 2,  # 256 = default page size
        max_batch_tokens=b * n,
        max_requests_per_batch=b,
        allow_block_sharing=False,
    )
    outs = hf.generate_batch(
        prompts, generation_config=config, continuous_batching_config=cb, record_timestamps=True
    )
    results = [outs[k] for k in sorted(outs, key=lambda k: int(k.rsplit("_", 1)[-1]))]
    failed = [r.error for r in results if r.error or not r.timestamps]
    if failed:
        raise RuntimeError(f"generate_batch failed: {failed[0]}")
    stamps = [r.timestamps or [] for r in results]
    start, end = max(s[0] for s in stamps), max(s[-1] for s in stamps)
    counted = sum(t > start for s in stamps for t in s)
    return DecodeRun(end - start, [list(r.generated_tokens) for r in results], counted)


def quiet_transformers() -> None:
    """Silence transformers' CPU-only notices (psutil, eos) that would break the progress bar;
    failures still surface through GenerationOutput.error."""
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
