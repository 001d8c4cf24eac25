"""One prefill batch on one TP rank: forward pass, KV sent layer by layer, first token sampled."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from pdserve.engine.attention import PrefillMetadata
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup, is_kv_sender, kv_head_range
from pdserve.engine.request import PrefillItem
from pdserve.engine.sampling import Sampler, SamplerOutput, SamplingRow
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.layout import pack_layer, token_ranges
from pdserve.kv_transfer.link import KVLink


class PrefillRunner:
    """Holds one rank's model shard; runs batches the leader hands to every rank alike."""

    def __init__(self, model: CausalLM, tp: TPGroup, device: torch.device) -> None:
        self.model = model
        self.tp = tp
        self.device = device
        cfg = model.config
        self.head_start, self.head_end = kv_head_range(cfg.num_kv_heads, tp.rank, tp.size)
        self.sends_kv = is_kv_sender(cfg.num_kv_heads, tp.rank, tp.size)
        self.sampler = Sampler()

    @torch.inference_mode()
    def run(
        self, items: Sequence[PrefillItem], links: Mapping[int, KVLink]
    ) -> SamplerOutput | None:
        """Prefill ``items``; returns sampled first tokens on rank 0, None elsewhere.

        Every KV-sending rank sends each destination one header, then one tensor per layer as soon
        as the layer's K/V exist (overlapping the rest of the forward pass), and rank 0 finally
        sends the first tokens. All sends have left when this returns.
        """
        seq_lens = [len(item.prompt_token_ids) for item in items]
        ranges = token_ranges(seq_lens)
        # destination decode instance -> indices of its items in this batch
        by_dest: dict[int, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            by_dest[item.decode_instance].append(i)
        if self.sends_kv:
            for dest, idx in by_dest.items():
                links[dest].send_header(self._header([items[i] for i in idx]))

        def send_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            # k, v: [T, kv_heads_local, head_dim] for the whole packed batch
            for dest, idx in by_dest.items():
                for part in pack_layer(k, v, [ranges[i] for i in idx]):  # K, then V
                    links[dest].send_tensor(part)

        input_ids = torch.tensor(
            [t for it in items for t in it.prompt_token_ids], device=self.device
        )
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(self.device)
        hidden = self.model(
            input_ids,
            positions,
            PrefillMetadata(seq_lens),
            None,
            send_layer if self.sends_kv else None,
        )
        out = None
        if self.tp.rank == 0:
            last = torch.tensor([end - 1 for _, end in ranges], device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, last))
            rows = [SamplingRow(it.sampling, it.prompt_token_ids, ()) for it in items]
            out = self.sampler(logits, rows)
            for dest, idx in by_dest.items():
                links[dest].send_tensor(torch.tensor([out.token_ids[i] for i in idx]))
        if self.sends_kv:
            for dest in by_dest:
                links[dest].flush()
        return out

    def _header(self, items: Sequence[PrefillItem]) -> TransferHeader:
        cfg = self.model.config
        return TransferHeader(
            items=tuple(
                TransferItem(it.transfer_id, it.request_id, len(it.prompt_token_ids), it.block_ids)
                for it in items
            ),
            num_layers=cfg.num_layers,
            dtype=str(cfg.dtype).removeprefix("torch."),
            head_start=self.head_start,
            head_end=self.head_end,
            head_dim=cfg.head_dim,
            has_trailer=self.tp.rank == 0,
        )
