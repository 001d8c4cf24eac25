"""Pure decode steps from static buffers at padded batch sizes; on CUDA each size is a graph.

A decode step at batch 8 launches hundreds of small kernels, and on a GPU the launches, not the
math, set its time. A CUDA graph replays them all with one launch, but it replays fixed shapes
at fixed addresses. So a pure decode step (one query per sequence: no prefill chunks, no drafts)
is padded to the next of a few batch sizes (``cudagraph_capture_sizes``: 1, 2, 4, ... up to
``max_num_seqs``) and its inputs are copied into static buffers that every replay reads:

    ids, positions, context_lens, slots: [S]      block_tables: [S, max_blocks]

(``max_blocks``: blocks of a ``max_model_len`` sequence). A padded row decodes token 0 at
position 0 of a one-token sequence whose only block is the **scratch block**: one block
allocated past the block manager's ``num_blocks``, so no sequence ever owns it. Its K/V go
there, its attention reads only there, and its output row is dropped.

The padded path runs without capture too (CPU, ``enforce_eager``, and the warm-up before each
capture), so its equivalence to the plain path is tested on CPU; capture and replay need CUDA.
It serves the flex attention path only: flex reads the cache in place, so its shapes do not grow
with the sequences, where the SDPA path's gathered blocks do (a graph would have to gather
``max_blocks`` blocks per row). Bigger batches, mixed steps and drafts run the plain path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from pdserve.decode_worker.step import StepBatch
from pdserve.engine.attention import DecodeMetadata
from pdserve.engine.model import CausalLM
from pdserve.engine.paged_flex_attention import allow_compiled_shapes

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, given: Sequence[int] | None = None) -> tuple[int, ...]:
    """The padded batch sizes: ``given`` (sorted), else the powers of two below
    ``max_num_seqs`` and ``max_num_seqs`` itself (a step never holds more sequences)."""
    if given:
        return tuple(sorted(set(given)))
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return (*sizes, max_num_seqs)


class StaticDecode:
    """Runs pure decode steps of up to ``sizes[-1]`` sequences padded to one of ``sizes``, from
    static buffers; `capture` makes each size a CUDA graph that later steps replay."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        sizes: Sequence[int],
        max_blocks: int,
        scratch_block: int,
        backend: str,
    ) -> None:
        if scratch_block >= kv_cache.shape[1]:
            raise ValueError(f"scratch block {scratch_block} is not in the cache")
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.sizes = tuple(sorted(sizes))
        allow_compiled_shapes(len(self.sizes))  # each size is one compilation of the flex call
        self.max_blocks, self.scratch, self.backend = max_blocks, scratch_block, backend
        dev, most = kv_cache.device, self.sizes[-1]
        # rows: ids, positions, context_lens, slots, each [S] contiguous (one copy fills all)
        self.vectors = torch.zeros(4, most, dtype=torch.int64, device=dev)
        self.tables = torch.full((most, max_blocks), scratch_block, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def takes(self, batch: StepBatch) -> bool:
        """Whether ``batch`` is a pure decode step that fits the padded sizes."""
        return (
            bool(batch.seqs)
            and not batch.chunks
            and not any(batch.drafts)
            and len(batch.seqs) <= self.sizes[-1]
            and max(len(t) for t in batch.tables) <= self.max_blocks
        )

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Hidden states of each sequence's decode token: [B, hidden], B = len(batch.seqs)."""
        ids = [s.token_ids[-1] for s in batch.seqs]
        positions = [len(s.token_ids) - 1 for s in batch.seqs]
        size = next(s for s in self.sizes if s >= len(ids))
        self._fill(ids, positions, batch.tables, size)
        if size in self.graphs:
            graph, out = self.graphs[size]
            graph.replay()
            return out[: len(ids)]
        return self._forward(size)[: len(ids)]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size as a CUDA graph, largest first (the smaller ones reuse its memory
        pool). Each is run once before: the warm-up compiles the flex kernel for that size."""
        if self.kv_cache.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device; CPU runs the padded path eagerly")
        pool, device = torch.cuda.graph_pool_handle(), self.kv_cache.device
        try:
            for size in reversed(self.sizes):
                self._fill([], [], [], size)  # every row padding: only the scratch block is written
                self._forward(size)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(size)
                self.graphs[size] = (graph, out)
        finally:
            # a capture that fails ends inside torch.cuda.graph's exit, before it puts the
            # thread's stream back: later steps must not run on the capture stream
            torch.cuda.set_stream(torch.cuda.default_stream(device))
        logger.info("captured decode CUDA graphs at batch sizes %s", list(self.sizes))

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One all-padding run at the smallest size: on CUDA it compiles the flex kernel there,
        so a kernel this GPU cannot build fails at start-up, not in a step."""
        self._fill([], [], [], self.sizes[0])
        self._forward(self.sizes[0])

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, ctx, slots = self.vectors[:, :size]
        meta = DecodeMetadata(self.tables[:size], ctx, slots, backend=self.backend)
        return self.model(ids, positions, meta, self.kv_cache)  # [size, hidden]

    def _fill(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        tables: Sequence[Sequence[int]],
        size: int,
    ) -> None:
        """Real rows first, then padding rows: token 0 at position 0 in the scratch block."""
        bs, pad = self.block_size, size - len(ids)
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
        vectors = torch.tensor(
            [
                [*ids, *[0] * pad],
                [*positions, *[0] * pad],
                [*(p + 1 for p in positions), *[1] * pad],  # context_lens
                [*slots, *[self.scratch * bs] * pad],
            ],
            dtype=torch.int64,
        )
        table = torch.full((size, self.max_blocks), self.scratch, dtype=torch.int64)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.as_tensor(t, dtype=torch.int64)
        self.vectors[:, :size].copy_(vectors)
        self.tables[:size].copy_(table)


def start_static(static: StaticDecode, graphs: bool, required: bool) -> StaticDecode | None:
    """Ready the padded path at start-up on CUDA: capture its graphs (``graphs``), else compile
    its smallest size. When ``auto`` chose flex (not ``required``) and that fails (a kernel this
    GPU's Triton cannot build, a capture that meets a host sync), the replica runs its decode
    steps on the SDPA path instead of failing to start, and says so; an explicit ``flex``
    raises."""
    try:
        static.capture() if graphs else static.warm_up()
        return static
    except Exception as e:
        if required or not _device_usable(static.kv_cache.device):
            raise
        static.graphs.clear()
        logger.warning(
            "decode: the flex attention path failed to start on this device (%s: %s); decode "
            "steps run on SDPA instead. decode.attention_backend: flex shows the error, sdpa "
            "skips the attempt",
            type(e).__name__,
            e,
        )
        return None


def _device_usable(device: torch.device) -> bool:
    """Whether the GPU still runs work after a failed start: an error CUDA keeps (an illegal
    memory access) fails every later step too, so it must fail the start, not fall back."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
    except Exception:
        return False
    return True
