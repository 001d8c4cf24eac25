"""Measurements that need a second process, as in a deployment, for `pdserve profile`.

- `LinkBench`: this process is a prefill rank, a spawned process a decode replica running the
  real `KVReceiver` into a paged cache. It times (1) bare KV transfers of n tokens, the real
  protocol (header, K and V per layer, trailer), from the first send to the receiver's
  acknowledgement that the KV is written; (2) `PrefillRunner.run` sending its KV over the link:
  how long the prefill rank is busy, and when the KV has landed.
- `TPPrefillBench`: rank 0 here, ranks 1..tp-1 spawned, each holding its shard; a forward over
  a batch runs on every rank at once with real all-reduces (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pdserve.engine.attention import PrefillMetadata
from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import ModelSettings
from pdserve.engine.kv_cache import kv_cache_shape
from pdserve.engine.loader import load_model
from pdserve.engine.parallel import TPGroup, make_process_group
from pdserve.engine.request import PrefillItem
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.link import RECEIVER, SENDER, KVLink
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.prefill_worker.runner import PrefillRunner

HOST = "127.0.0.1"
TIMEOUT = datetime.timedelta(seconds=300)
CPU = torch.device("cpu")


def _ack_group(store: dist.Store, rank: int) -> dist.ProcessGroup:
    return make_process_group("gloo", dist.PrefixStore("ack", store), rank, 2)


def _receiver_main(port: int, cache_shape: tuple[int, ...], dtype: str, threads: int) -> None:
    """The decode side: a KVReceiver into a paged cache; acknowledges each landed batch."""
    torch.set_num_threads(threads)
    store = dist.TCPStore(HOST, port, 2, False, TIMEOUT)
    link = KVLink.connect("profile/link", "gloo", RECEIVER, CPU, HOST, port, store)
    acks = _ack_group(store, RECEIVER)
    cache = torch.zeros(cache_shape, dtype=getattr(torch, dtype))
    one = torch.ones(1, dtype=torch.int64)

    def on_batch(_: Any) -> None:
        acks.send([one], SENDER, 1).wait()

    def on_error(name: str, e: BaseException) -> None:
        acks.send([-one], SENDER, 1).wait()

    KVReceiver(link, cache, cache_shape[3], lambda _: True, on_batch, on_error).start()
    acks.recv([torch.empty(1, dtype=torch.int64)], SENDER, 2).wait()  # "done"
    # exit without tearing down gloo's threads under the receiver thread (it would abort)
    os._exit(0)


class LinkBench:
    """A real gloo KV link from this process to a receiver process (see module docstring)."""

    def __init__(self, config: ModelConfig, block_size: int, max_tokens: int, threads: int):
        self.config, self.block_size = config, block_size
        blocks = -(-max_tokens // block_size) + 64
        shape = kv_cache_shape(config, 1, blocks, block_size)
        dtype = str(config.dtype).removeprefix("torch.")
        store = dist.TCPStore(HOST, 0, 2, True, TIMEOUT, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self._proc = ctx.Process(target=_receiver_main, args=(store.port, shape, dtype, threads))
        self._proc.start()
        self.link = KVLink.connect("profile/link", "gloo", SENDER, CPU, HOST, store.port, store)
        self._acks = _ack_group(store, SENDER)
        self._store = store
        self._ids = iter(range(1, 1 << 30))

    def _wait_landed(self) -> None:
        ack = torch.empty(1, dtype=torch.int64)
        self._acks.recv([ack], RECEIVER, 1).wait()
        if int(ack) < 0:
            raise RuntimeError("the KV receiver reported a failed transfer during profiling")

    def transfer_ms(self, tokens: int) -> float:
        """One request's KV (all heads) over the link, first send to 'written' ack."""
        c = self.config
        blocks = tuple(range(-(-tokens // self.block_size)))
        header = TransferHeader(
            (TransferItem(next(self._ids), "profile", tokens, blocks),), c.num_layers,
            str(c.dtype).removeprefix("torch."), 0, c.num_kv_heads, c.head_dim, self.block_size,
            has_trailer=True,
        )  # fmt: skip
        layer = torch.randn(header.layer_shape()).to(c.dtype)  # as prefill packs a layer
        start = time.perf_counter()
        self.link.send_header(header)
        for _ in range(c.num_layers):
            self.link.send_tensor(layer)
        self.link.send_tensor(torch.tensor([7]))
        self.link.flush()
        self._wait_landed()
        return (time.perf_counter() - start) * 1e3

    def prefill_send(
        self, runner: PrefillRunner, prompts: Sequence[list[int]]
    ) -> tuple[float, float]:
        """(ms the prefill rank is busy in PrefillRunner.run, ms until the KV has landed)."""
        from pdserve.bench.profile.timers import greedy

        items, first = [], 0
        for p in prompts:
            n = -(-len(p) // self.block_size)
            blocks = tuple(range(first, first + n))
            items.append(PrefillItem(next(self._ids), "profile", tuple(p), greedy(1), 0, blocks))
            first += n
        start = time.perf_counter()
        _, broken = runner.run(items, {0: self.link})
        if broken:
            raise RuntimeError(f"KV link failed while profiling: {broken[0]}")
        busy = time.perf_counter() - start
        self._wait_landed()
        return busy * 1e3, (time.perf_counter() - start) * 1e3

    def close(self) -> None:
        self.link.close()
        self._acks.send([torch.zeros(1, dtype=torch.int64)], RECEIVER, 2).wait()
        self._proc.join(timeout=60)


def _tp_rank_main(
    rank: int, tp: int, port: int, model: ModelSettings, commands: Any, device_type: str
) -> None:
    """Ranks 1..tp-1: join the TP group, load the shard, run each batch rank 0 announces."""
    torch.set_num_threads(model.num_threads)
    device = torch.device("cuda", rank) if device_type == "cuda" else CPU
    store = dist.TCPStore(HOST, port, tp, False, TIMEOUT)
    backend = "nccl" if device_type == "cuda" else "gloo"
    pg = make_process_group(backend, dist.PrefixStore("tp", store), rank, tp)
    config = ModelConfig.of(model)
    shard = load_model(config, TPGroup(rank, tp, pg), device)
    while (lens := commands.get()) is not None:
        _forward(shard, config, lens, device)


@torch.inference_mode()
def _forward(model: Any, config: ModelConfig, lens: Sequence[int], device: torch.device) -> None:
    # input_ids, positions: [T] packed; every rank runs the same shapes, so all-reduces pair up
    total = sum(lens)
    ids = torch.randint(min(8, config.vocab_size - 1), config.vocab_size, (total,), device=device)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    hidden = model(ids, positions, PrefillMetadata(list(lens)))
    last = torch.tensor(lens, device=device).cumsum(0) - 1
    model.compute_logits(hidden.index_select(0, last))


class TPPrefillBench:
    """Prefill forward at TP degree `tp` across `tp` processes; `__call__` times rank 0."""

    def __init__(self, model: ModelSettings, tp: int) -> None:
        self.device_type = torch.device(model.device).type
        store = dist.TCPStore(HOST, 0, tp, True, TIMEOUT, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self._queues = [ctx.Queue() for _ in range(1, tp)]
        self._procs = [
            ctx.Process(target=_tp_rank_main, args=(r, tp, store.port, model, q, self.device_type))
            for r, q in zip(range(1, tp), self._queues)
        ]
        for proc in self._procs:
            proc.start()
        self.device = torch.device("cuda", 0) if self.device_type == "cuda" else CPU
        backend = "nccl" if self.device_type == "cuda" else "gloo"
        pg = make_process_group(backend, dist.PrefixStore("tp", store), 0, tp)
        self.config = ModelConfig.of(model)
        self.model = load_model(self.config, TPGroup(0, tp, pg), self.device)
        self._store = store

    def __call__(self, lens: Sequence[int]) -> float:
        for q in self._queues:
            q.put(list(lens))
        start = time.perf_counter()
        _forward(self.model, self.config, lens, self.device)
        if self.device_type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - start) * 1e3

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for proc in self._procs:
            proc.join(timeout=60)
