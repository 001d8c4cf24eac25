"""One prefill step's KV sends: per destination decode replica a header, then per layer (as soon
as the layer's K/V exist) the blocks each prompt's part sends, then from rank 0 a trailer with
the first tokens of the prompts completed.

Two sources: ``CacheSends`` reads the blocks from the rank's paged cache (a worker's steps);
``ForwardSends`` packs them from the forward's own K/V (a cacheless runner: benchmarks and
profiles). Both go through ``LinkSends``: a destination whose link fails is skipped from then
on, its reason kept in ``broken``, and the batch's other destinations still get theirs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch

from pdserve.engine.kv_quant import movable, to_cache_rows
from pdserve.engine.request import PrefillItem
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.layout import pack_layer, wire_plan
from pdserve.kv_transfer.link import KVLink
from pdserve.prefill_worker.scheduler import PrefillWork

# a rank's cache holds all KV of a prompt's blocks, so one gather per layer and destination
# makes its wire tensor: [blocks, 2, block_size, heads, row], the decode cache's layout


def transfer_item(work: PrefillWork, block_size: int) -> TransferItem:
    """The part of ``work``'s prompt this step sends: its blocks [send_start, send_end)."""
    item, a, b = work.item, work.send_start, work.send_end
    n = max(0, min(work.prompt_len, b * block_size) - a * block_size)
    return TransferItem(item.transfer_id, item.request_id, n, item.block_ids[a:b], a, work.last)


class LinkSends:
    """Sends to several decode replicas, by destination; a destination whose link fails is
    skipped from then on (``broken`` says why)."""

    def __init__(self, links: Mapping[int, KVLink], dests: Sequence[int]) -> None:
        self.links = links
        self.by_dest: dict[int, list[int]] = defaultdict(list)  # replica -> its items' indices
        for i, dest in enumerate(dests):
            self.by_dest[dest].append(i)
        self.broken: dict[int, str] = {}

    def flush(self) -> None:
        for dest in self.by_dest:
            self._on_link(dest, KVLink.flush)

    def _on_link(self, dest: int, op: Callable[[KVLink], None]) -> None:
        if dest in self.broken:
            return
        link = self.links.get(dest)
        if link is None:
            self.broken[dest] = f"no KV link to decode replica {dest} on this rank"
            return
        try:
            op(link)
        except RuntimeError as e:  # gloo/NCCL: the peer closed or the group was torn down
            self.broken[dest] = f"KV link to decode replica {dest} failed: {e}"


class CacheSends(LinkSends):
    """A step's sends, read from the rank's paged cache."""

    def __init__(
        self,
        works: Sequence[PrefillWork],
        links: Mapping[int, KVLink],
        cache: torch.Tensor,
        block_size: int,
    ) -> None:
        self.works = [w for w in works if w.sends]
        super().__init__(links, [w.item.decode_instance for w in self.works])
        self.cache, self.block_size = cache, block_size
        self.items = {
            d: tuple(transfer_item(self.works[i], block_size) for i in idx)
            for d, idx in self.by_dest.items()
        }
        self.gather = {d: self._gather(idx) for d, idx in self.by_dest.items()}

    def _gather(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache blocks to send, in wire order, and the K/V rows of the unused tail of each
        prompt's last block (in the wire's [blocks * 2 * block_size] rows): sent as zeros."""
        bs = self.block_size
        blocks: list[int] = []
        pad: list[torch.Tensor] = []
        for i in idx:
            w = self.works[i]
            blocks += w.table[w.send_start : w.send_end]
            tail = w.prompt_len % bs
            if w.last and tail and w.send_end > w.send_start:
                last = (len(blocks) - 1) * 2 * bs
                rows = torch.arange(tail, bs)
                pad += [last + rows, last + bs + rows]
        device = self.cache.device
        ids = torch.tensor(blocks, dtype=torch.int64, device=device)
        rows = torch.cat(pad).to(device) if pad else torch.empty(0, dtype=torch.int64)
        return ids, rows

    def headers(self, header: Callable[[tuple[TransferItem, ...], bool], TransferHeader]) -> None:
        for dest, items in self.items.items():
            h = header(items, any(item.last for item in items))
            self._on_link(dest, partial(KVLink.send_header, header=h))

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # called once the layer's K/V are in the cache: every block to send is there
        cache = self.cache[layer]  # [num_blocks, 2, block_size, heads, row]
        for dest, (ids, pad) in self.gather.items():
            if dest in self.broken or not ids.numel():  # only first tokens go there
                continue
            wire = movable(cache).index_select(0, ids)  # float8 as bytes: CPU has no index_fill_
            if pad.numel():
                wire.view(-1, *wire.shape[3:]).index_fill_(0, pad, 0)
            self._on_link(dest, partial(KVLink.send_tensor, tensor=wire.view(cache.dtype)))

    def trailers(self, first_tokens: Mapping[int, int]) -> None:
        """Rank 0: each destination's token per item (the first token of a completed prompt,
        by transfer id; -1 for a part that is not its prompt's last)."""
        for dest, items in self.items.items():
            if any(item.last for item in items):
                tokens = [first_tokens.get(it.transfer_id, -1) if it.last else -1 for it in items]
                self._on_link(dest, partial(KVLink.send_tensor, tensor=torch.tensor(tokens)))


class ForwardSends(LinkSends):
    """One batch's sends, packed from the forward's own K/V (a runner without a cache): each
    item's KV from its first block the decode replica does not hold."""

    def __init__(
        self,
        items: Sequence[PrefillItem],
        links: Mapping[int, KVLink],
        ranges: Sequence[tuple[int, int]],
        block_size: int,
        kv_dtype: torch.dtype,
    ) -> None:
        super().__init__(links, [item.decode_instance for item in items])
        self.items, self.kv_dtype = items, kv_dtype
        self.plans = {
            dest: wire_plan([ranges[i] for i in idx], block_size)
            for dest, idx in self.by_dest.items()
        }

    def headers(self, header: Callable[[Sequence[PrefillItem]], TransferHeader]) -> None:
        for dest, idx in self.by_dest.items():
            h = header([self.items[i] for i in idx])
            self._on_link(dest, partial(KVLink.send_header, header=h))

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [T, kv_heads_local, head_dim] views for the whole packed batch, converted (or
        # quantized) once into the cache's format, as the decode side's own writes would
        k, v = to_cache_rows(k, self.kv_dtype), to_cache_rows(v, self.kv_dtype)
        for dest, plan in self.plans.items():
            if dest not in self.broken and plan.num_blocks:  # whole prompts cached: no layers
                self._on_link(dest, partial(KVLink.send_tensor, tensor=pack_layer(k, v, plan)))

    def trailers(self, first_tokens: Sequence[int]) -> None:
        for dest, idx in self.by_dest.items():
            tokens = torch.tensor([first_tokens[i] for i in idx])
            self._on_link(dest, partial(KVLink.send_tensor, tensor=tokens))
