"""The decode side of a link: a thread that receives batches of KV and writes them into blocks."""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine.kv_quant import kv_dtype_name
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.layout import run_start, wire_blocks, write_layer
from pdserve.kv_transfer.link import KVLink

logger = logging.getLogger(__name__)


class TransferStalled(RuntimeError):
    """A batch whose header arrived stopped arriving for ``stall_s``: the link is dropped."""


@dataclass(frozen=True)
class ReceivedBatch:
    """One header's worth of KV, written into the cache."""

    link: str
    header: TransferHeader
    accepted: tuple[bool, ...]  # per item: written (True) or drained and dropped (False)
    first_tokens: tuple[int, ...] | None  # per item, when the sender sampled them
    nbytes: int
    seconds: float  # from the header's arrival to the last layer written
    backend: str = "gloo"  # how the link moves KV (kv_transfer.peers)


class KVReceiver:
    """Receives on one link until the sender closes it or the link fails.

    All layer receives of a batch are posted at once, so the wire stays busy while earlier layers
    are written into blocks. ``accept`` is asked once per item when its header arrives: an item
    refused (unknown or aborted transfer) is still drained to keep the stream in step, but not
    written. The owner must not reuse an accepted item's blocks before ``on_batch`` reports it.
    A header the cache cannot take (another KV format, layer count or block size) fails the
    link: its batch is drained (the sender's sends complete), then ``on_error`` gets the reason
    after the items were accepted (so the owner fails them with it), and the group is torn down.
    """

    def __init__(
        self,
        link: KVLink,
        kv_cache: torch.Tensor,
        block_size: int,
        accept: Callable[[TransferItem], bool],
        on_batch: Callable[[ReceivedBatch], None],
        on_error: Callable[[str, BaseException], None],
        stall_s: float | None = None,
    ) -> None:
        self.link = link
        # the longest wait for one tensor of a batch whose header arrived (None: no bound); an
        # idle link between batches waits without a bound
        self._stall = None if stall_s is None else datetime.timedelta(seconds=stall_s)
        self._kv_cache = kv_cache  # [layers, num_blocks, 2, block_size, heads, row]
        self._kv_dtype = kv_dtype_name(kv_cache.dtype)  # the format every header must carry
        self._block_size = block_size
        self._accept = accept
        self._on_batch = on_batch
        self._on_error = on_error
        self._arena = torch.empty(0, dtype=torch.uint8, device=link.device)
        self._thread = threading.Thread(target=self._run, name=f"kv-recv-{link.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                header = self.link.recv_header()
                if header.close:  # the sender closed it, or this side stopped it
                    logger.info("kv link %s closed", self.link.name)
                    self.link.abort()
                    return
                self._on_batch(self._receive(header))
        except Exception as e:  # the link is dead; the owner fails its transfers
            logger.error("kv link %s failed: %s", self.link.name, e)
            self._on_error(self.link.name, e)
            self.link.abort()

    @property
    def alive(self) -> bool:
        """Still receiving (not closed by either end, not failed)."""
        return self._thread.is_alive()

    def stop(self, peer_dead: bool = False) -> None:
        """End the thread once the link is idle (its sender is gone or was replaced)."""
        self.link.stop(peer_dead)

    def _problem(self, header: TransferHeader) -> str | None:
        """Why this cache cannot take the header's KV as it is sent, or None."""
        if header.dtype != self._kv_dtype:
            return (
                f"the prefill rank sends KV as {header.dtype} but this decode replica's cache "
                f"stores {self._kv_dtype}: give both pools the same decode.kv_cache.dtype "
                "(LLM kv_cache_dtype=) and the same pdserve version"
            )
        if header.num_layers != self._kv_cache.shape[0]:
            return f"header has {header.num_layers} layers, cache has {self._kv_cache.shape[0]}"
        if header.block_size != self._block_size:
            return (
                f"header packs blocks of {header.block_size} tokens, the cache holds "
                f"{self._block_size}: give prefill and decode the same block_size"
            )
        return None

    def _drain(self, header: TransferHeader) -> None:
        """Receive and drop a batch as its header describes it."""
        buf = self._staging(header.layer_bytes(), torch.uint8)
        for _ in range(header.wire_layers):
            self._wait(self.link.recv_tensor(buf))
        if header.has_trailer:
            trailer = torch.empty(len(header.items), dtype=torch.int64, device=self.link.device)
            self._wait(self.link.recv_tensor(trailer))

    def _receive(self, header: TransferHeader) -> ReceivedBatch:
        start = time.perf_counter()
        accepted = tuple(self._accept(item) for item in header.items)
        problem = self._problem(header)
        if problem is not None:  # the owner fails the accepted items with the reason
            self._drain(header)
            raise ValueError(problem)
        dtype = self._kv_cache.dtype
        all_kept = all(accepted)
        first_block = run_start(header.items, self._block_size) if all_kept else None
        in_place = first_block is not None and self._lands_in_place(header)
        targets, bufs = self._targets(header, dtype, first_block if in_place else None)
        # Post every receive at once, making each target just before its receive: a layer's
        # bytes wait in gloo until its receive is posted, so the first goes up first.
        works = [self.link.recv_tensor(t) for t in targets]
        trailer = torch.empty(len(header.items), dtype=torch.int64, device=self.link.device)
        trailer_work = self.link.recv_tensor(trailer) if header.has_trailer else None
        blocks = keep = None
        if bufs is not None:  # staged, then written: each wire block's destination and mask
            blocks, keep = wire_blocks(header.items, self._block_size, accepted)
        for layer, work in enumerate(works):
            self._wait(work)
            if bufs is not None:
                assert blocks is not None and keep is not None
                write_layer(
                    self._kv_cache[layer],
                    bufs[layer],
                    blocks,
                    header.head_start,
                    None if all_kept else keep,
                )
        nbytes = header.num_layers * header.layer_bytes()  # compressed: codes and scales
        first = None
        if trailer_work is not None:
            self._wait(trailer_work)
            first = tuple(int(t) for t in trailer.tolist())
        seconds = time.perf_counter() - start
        return ReceivedBatch(
            self.link.name, header, accepted, first, nbytes, seconds, self.link.backend
        )

    def _wait(self, work: Any) -> None:
        """Wait for one receive of a batch; TransferStalled past the stall bound (the caller's
        failure path then drops the link, so no late byte lands in freed blocks)."""
        if self._stall is None:
            work.wait()
            return
        try:
            work.wait(self._stall)
        except RuntimeError as e:
            if "Timed out" not in str(e):
                raise
            raise TransferStalled(
                f"link {self.link.name}: a transfer stalled for over {self._stall.total_seconds():g}"
                " s mid-batch (decode.kv_lease_s): aborted"
            ) from e

    def _lands_in_place(self, header: TransferHeader) -> bool:
        """The link carries every head (in the cache's format: checked) to the cache's device."""
        cache = self._kv_cache
        return cache.device == self.link.device and header.num_heads == cache.shape[-2]

    def _targets(
        self, header: TransferHeader, dtype: torch.dtype, start: int | None
    ) -> tuple[Iterator[torch.Tensor], list[torch.Tensor] | None]:
        """Where each layer's wire tensor lands, layer by layer (made lazily: a caller posts
        the first before the rest exist): straight into the cache's blocks from block
        ``start`` (the blocks form one ascending run and the link carries every head: no copy
        at all), else a staging arena written into the blocks afterwards. Returns the targets
        and the staging buffers (None when in place)."""
        cache = self._kv_cache  # [layers, num_blocks, 2, block_size, heads, row]
        if not header.wire_layers:  # every prompt is cached here: only the trailer comes
            return iter(()), []
        layers = range(header.num_layers)
        if start is not None:
            end = start + header.num_blocks
            return (cache[layer, start:end] for layer in layers), None
        # a reused arena: fresh buffers per transfer would cost a page fault per 4 KiB written,
        # which on CPU halves the link's throughput
        shape = header.layer_shape()
        staging = self._staging(header.num_layers * header.layer_bytes() // dtype.itemsize, dtype)
        bufs = list(staging.view(header.num_layers, *shape).unbind(0))
        return iter(bufs), bufs

    def _staging(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A [numel] tensor of ``dtype`` backed by the arena, grown (never shrunk) on demand."""
        nbytes = numel * dtype.itemsize
        if self._arena.numel() < nbytes:
            self._arena = torch.empty(nbytes, dtype=torch.uint8, device=self.link.device)
        return self._arena[:nbytes].view(dtype)
