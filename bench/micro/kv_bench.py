"""KV transfer throughput: pdserve's link protocol vs raw torch.distributed send/recv.

Two processes, as in a deployment: a sender (prefill rank) and a receiver (decode replica). For
each prompt length it moves one request's KV cache four ways, interleaved round by round, each
timed on the sender from the first send to the receiver's 8-byte acknowledgement:

- raw-1:    one send of all the bytes (the backend's best case; the baseline);
- raw-L:    one send per layer into plain, pre-posted buffers: pdserve's message pattern in
            plain torch.distributed;
- pdserve:  the whole protocol, cold (every byte ready before it starts): msgpack header, one
            tensor per layer (K and V in the cache's block layout), trailer; received by
            KVReceiver straight into a paged cache (what decode really does);
- streamed: the same, with the header sent ``--lead-ms`` before the clock starts, as in a
            prefill, which sends the header before its forward pass and each layer's K/V as
            the forward produces it (layer 0 alone takes longer than the default 2 ms on CPU).

Every mode moves the same bytes: each layer as prefill's ``pack_layer`` makes it (that copy is
the forward's, where ``.contiguous()`` copies of K and V used to be, and is not timed here). The
receiver checks at the end that the KV landed in the cache exactly as sent.

``--kv-dtype int8`` (or fp8_e4m3, bfloat16, ...) sends the KV in that cache format, as a
deployment with ``decode.kv_cache.dtype`` does: int8/fp8 rows are codes plus a float16 scale,
so fewer bytes cross the link. GB/s stays the wire's rate; the table adds each case's ms
(pdserve mode) and the sender's quantization ms (all layers, timed apart: in a prefill it runs
in the forward's layer hook).

``--device cuda`` keeps the KV on the GPU, sender and receiver on cuda:0 (``--backend host`` or
``cuda_ipc``: one GPU's same-device paths), or on cuda:0 and cuda:1 over NCCL. The raw modes go
over NCCL beside an NCCL link, else over gloo from host memory; each clock stops at an ack the
receiver sends once its device is synchronized.

    python -m pdserve.bench.micro.kv_bench --tokens 128 512 1024 2048 4096 --out kv.json
    python -m pdserve.bench.micro.kv_bench --tokens 1024 4096 --kv-dtype int8
    python -m pdserve.bench.micro.kv_bench --device cuda --backend cuda_ipc --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pdserve.engine.kv_format import row_bytes, row_width
from pdserve.engine.kv_quant import TORCH_DTYPES, movable, to_cache_rows
from pdserve.engine.parallel import make_process_group
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.layout import pack_layer, wire_blocks, wire_plan
from pdserve.kv_transfer.link import BACKENDS, RECEIVER, SENDER, KVLink
from pdserve.kv_transfer.receiver import KVReceiver, ReceivedBatch


@dataclass(frozen=True)
class Shape:
    layers: int = 24
    kv_heads: int = 8
    head_dim: int = 64
    block_size: int = 16
    dtype: str = "float32"  # the model's: K/V as the forward makes them
    scattered: bool = False  # destination blocks not one ascending run (a churned cache)
    kv_dtype: str = "auto"  # the cache's format, as sent ("auto": dtype)

    @property
    def kv_format(self) -> str:
        return self.dtype if self.kv_dtype == "auto" else self.kv_dtype

    @property
    def row(self) -> int:
        return row_width(self.kv_format, self.head_dim)

    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * row_bytes(self.kv_format, self.head_dim)


def _header(shape: Shape, tokens: int) -> TransferHeader:
    blocks = tuple(range(-(-tokens // shape.block_size)))
    if shape.scattered:  # blocks out of order: the receiver stages and scatters
        blocks = blocks[::-1]
    item, heads = TransferItem(1, "bench", tokens, blocks), (0, shape.kv_heads)
    s = shape
    return TransferHeader((item,), s.layers, s.kv_format, *heads, s.head_dim, s.block_size, True)


MODES = ("raw-1", "raw-L", "pdserve", "streamed")
TOKENS = (128, 512, 1024, 2048, 4096)  # the default prompt lengths: one request's KV each


@dataclass(frozen=True)
class Wire:
    """The KV link's backend (``auto``: what the two ends agree on) and where the KV lives."""

    backend: str = "gloo"
    device: str = "cpu"  # cuda: the sender on cuda:0; the receiver too, or on cuda:1 over NCCL

    def device_of(self, rank: int) -> torch.device:
        if self.device == "cpu":
            return torch.device("cpu")
        return torch.device("cuda:1" if rank == RECEIVER and self.backend == "nccl" else "cuda:0")


def _kv(shape: Shape, tokens: int) -> tuple[torch.Tensor, float]:
    """One request's KV on the wire, [layers, blocks, 2, block_size, heads, row], quantized
    (``to_cache_rows``) and packed (``pack_layer``) as a prefill rank does; the same on both
    sides. Also the seconds the quantization took."""
    gen = torch.Generator().manual_seed(tokens)
    kv = torch.randn(shape.layers, 2, tokens, shape.kv_heads, shape.head_dim, generator=gen)
    kv = kv.to(TORCH_DTYPES[shape.dtype])
    fmt = TORCH_DTYPES[shape.kv_format]
    start = time.perf_counter()
    rows = [(to_cache_rows(k, fmt), to_cache_rows(v, fmt)) for k, v in kv]
    seconds = time.perf_counter() - start
    plan = wire_plan([(0, tokens)], shape.block_size)
    return torch.stack([pack_layer(k, v, plan) for k, v in rows]), seconds


def _raw_ops(pg: Any, whole: torch.Tensor, mode: str, op: str, peer: int) -> None:
    """The raw modes' sends (or receives) of ``whole``, all posted, then waited."""
    parts = [whole] if mode == "raw-1" else list(whole.unbind(0))
    works = [getattr(pg, op)([t], peer, 0) for t in parts]
    for w in works:
        w.wait()


def _groups(wire: Wire, rank: int, store: dist.TCPStore) -> tuple[KVLink, Any, Any, str]:
    """The KV link, the raw modes' group and device, the acks' group (gloo: the host waits)."""
    device = wire.device_of(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    link = KVLink.connect("bench/link", wire.backend, rank, device, "127.0.0.1", store.port, store)
    nccl = link.backend == "nccl"  # what the two ends agreed on
    raw = make_process_group("nccl" if nccl else "gloo", dist.PrefixStore("raw", store), rank, 2)
    acks = make_process_group("gloo", dist.PrefixStore("ack", store), rank, 2) if nccl else raw
    return link, raw, acks, str(device) if nccl else "cpu"  # else raw modes from host memory


def _sender(
    port: int, shape: Shape, lengths: list[int], repeats: int, lead_s: float, wire: Wire, out: dict
) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, False, datetime.timedelta(seconds=60))
    link, raw, acks, raw_device = _groups(wire, SENDER, store)
    ack = torch.zeros(1, dtype=torch.int64)
    results: dict[int, dict[str, Any]] = {}
    for tokens in lengths:
        whole = _kv(shape, tokens)[0].to(wire.device_of(SENDER))  # as the forward leaves it
        whole_raw = whole.to(raw_device)
        if whole.is_cuda:
            torch.cuda.synchronize(whole.device)
        quantize = [_kv(shape, tokens)[1] for _ in range(repeats)]
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for rep in range(repeats + 1):  # the first round warms up
            for mode in MODES:
                if mode == "streamed":  # off the clock, as layer 0's forward is in a prefill
                    link.send_header(_header(shape, tokens))
                    time.sleep(lead_s)
                start = time.perf_counter()
                if mode.startswith("raw"):
                    _raw_ops(raw, whole_raw, mode, "send", RECEIVER)
                else:
                    if mode == "pdserve":
                        link.send_header(_header(shape, tokens))
                    for layer in whole:
                        link.send_tensor(layer)  # as prefill sends them
                    link.send_tensor(torch.tensor([7]))
                    link.flush()
                acks.recv([ack], RECEIVER, 1).wait()
                if rep:
                    times[mode].append(time.perf_counter() - start)
        nbytes = tokens * shape.bytes_per_token()
        results[tokens] = {m: nbytes / statistics.median(t) / 1e9 for m, t in times.items()}
        results[tokens]["bytes"] = nbytes
        results[tokens]["ms"] = statistics.median(times["pdserve"]) * 1e3
        results[tokens]["quantize_ms"] = statistics.median(quantize) * 1e3
        results[tokens]["backend"] = link.backend
    link.close()
    out.update(results)


def _receiver(
    store: dist.TCPStore, shape: Shape, tokens_list: list[int], repeats: int, wire: Wire
) -> None:
    torch.set_num_threads(1)
    link, raw, acks, raw_device = _groups(wire, RECEIVER, store)
    dtype = TORCH_DTYPES[shape.kv_format]
    max_blocks = -(-max(tokens_list) // shape.block_size)
    dims = (shape.layers, max_blocks, 2, shape.block_size, shape.kv_heads, shape.row)
    cache = torch.zeros(dims, dtype=dtype, device=wire.device_of(RECEIVER))
    landed = threading.Semaphore(0)
    failed: list[BaseException] = []

    def on_batch(_: ReceivedBatch) -> None:
        landed.release()

    def on_error(_: str, e: BaseException) -> None:
        failed.append(e)
        landed.release()

    receiver = KVReceiver(link, cache, shape.block_size, lambda _: True, on_batch, on_error)
    receiver.start()
    ack = torch.ones(1, dtype=torch.int64)
    for tokens in tokens_list:
        layers = (shape.layers, *_header(shape, tokens).layer_shape())
        whole = torch.empty(layers, dtype=dtype, device=raw_device)
        for _ in range(repeats + 1):
            for mode in MODES:
                if mode.startswith("raw"):
                    _raw_ops(raw, whole, mode, "recv", SENDER)
                else:
                    landed.acquire()
                    if failed:
                        raise RuntimeError(f"the KV link failed: {failed[0]}")
                if cache.is_cuda:  # the bytes are in place, not merely queued on a stream
                    torch.cuda.synchronize(cache.device)
                acks.send([ack], SENDER, 1).wait()
        sent = movable(_kv(shape, tokens)[0])
        blocks, _ = wire_blocks(_header(shape, tokens).items, shape.block_size)
        in_cache = movable(cache)[:, blocks].cpu()
        if not (torch.equal(movable(whole.cpu()), sent) and torch.equal(in_cache, sent)):
            raise RuntimeError(f"{tokens} tokens: the KV did not arrive as sent")


def run(
    shape: Shape, tokens_list: list[int], repeats: int, lead_ms: float = 2.0, wire: Wire = Wire()
) -> dict:
    """Per prompt length: GB/s of every mode, bytes, ms and quantize_ms (see the module doc)."""
    store = KVLink.host_store("127.0.0.1")
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    out = manager.dict()
    proc = ctx.Process(
        target=_sender,
        args=(store.port, shape, tokens_list, repeats, lead_ms / 1e3, wire, out),
        daemon=True,
    )
    proc.start()
    _receiver(store, shape, tokens_list, repeats, wire)
    proc.join()
    return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="prompt lengths")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=("auto", *TORCH_DTYPES),
        help="the KV cache format on the wire (decode.kv_cache.dtype; auto: --dtype)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per case (median)")
    p.add_argument(
        "--scattered", action="store_true", help="blocks out of order: staged, then scattered"
    )
    p.add_argument(
        "--lead-ms", type=float, default=2.0, help="streamed mode: the header's lead on the KV"
    )
    p.add_argument("--backend", default="gloo", choices=BACKENDS, help="the KV link's backend")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the KV lives")
    p.add_argument("--out", default=None, help="write the raw numbers as JSON here")
    args = p.parse_args()
    shape = Shape(
        args.layers, args.kv_heads, args.head_dim, 16, args.dtype, args.scattered, args.kv_dtype
    )
    wire = Wire(args.backend, args.device)
    if args.device == "cuda" and torch.cuda.device_count() < 1 + (args.backend == "nccl"):
        p.error(f"--backend {args.backend} --device cuda: too few GPUs here (nccl takes two)")
    results = run(shape, args.tokens, args.repeats, args.lead_ms, wire)
    backend = results[args.tokens[0]]["backend"]
    print(f"KV {asdict(shape)}: {shape.bytes_per_token()} bytes/token, {backend} on {wire.device}")
    print("GB/s per mode, each mode over raw-1 (the baseline), then ms (pdserve; quantize):")
    print(f"{'tokens':>7} {'MiB':>7} " + " ".join(f"{m:>9}" for m in MODES) + " |"
          + " ".join(f"{m:>9}" for m in MODES[1:]) + f" | {'ms':>7} {'quant':>7}")  # fmt: skip
    for tokens in args.tokens:
        r = results[tokens]
        print(f"{tokens:>7} {r['bytes'] / 2**20:>7.1f} "
              + " ".join(f"{r[m]:>9.2f}" for m in MODES) + " |"
              + " ".join(f"{r[m] / r['raw-1']:>9.2f}" for m in MODES[1:])
              + f" | {r['ms']:>7.2f} {r['quantize_ms']:>7.2f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            report = {"shape": asdict(shape), "wire": asdict(wire), "results": results}
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
