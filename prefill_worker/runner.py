"""One prefill batch on one TP rank: forward pass, KV sent layer by layer, first token sampled."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch

from pdserve.engine.attention import PrefillMetadata
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup, is_kv_sender, kv_head_range
from pdserve.engine.request import PrefillItem
from pdserve.engine.sampling import Sampler
from pdserve.engine.sampling_types import SamplerOutput, SamplingRow
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.layout import pack_layer, token_ranges, wire_plan
from pdserve.kv_transfer.link import KVLink


class PrefillRunner:
    """Holds one rank's model shard; runs batches the leader hands to every rank alike."""

    def __init__(self, model: CausalLM, tp: TPGroup, device: torch.device, block_size: int) -> None:
        self.model = model
        self.tp = tp
        self.device = device
        self.block_size = block_size  # the decode replicas' (the KV travels in their layout)
        cfg = model.config
        self.head_start, self.head_end = kv_head_range(cfg.num_kv_heads, tp.rank, tp.size)
        self.sends_kv = is_kv_sender(cfg.num_kv_heads, tp.rank, tp.size)
        self.sampler = Sampler()

    @torch.inference_mode()
    def run(
        self, items: Sequence[PrefillItem], links: Mapping[int, KVLink]
    ) -> tuple[SamplerOutput | None, dict[int, str]]:
        """Prefill ``items``; returns the sampled first tokens on rank 0 (None elsewhere) and the
        destinations whose link failed, each with the reason.

        Every KV-sending rank sends each destination one header, then one tensor per layer (K and
        V in the decode cache's block layout) as soon as the layer's K/V exist (overlapping the
        rest of the forward pass), and rank 0 finally sends the first tokens. All sends have left when this returns. A link that fails (its
        decode replica died, or it was never made) stops only the sends to that destination: the
        batch's other items still reach theirs.
        """
        seq_lens = [len(item.prompt_token_ids) for item in items]
        ranges = token_ranges(seq_lens)
        # destination decode instance -> indices of its items in this batch
        by_dest: dict[int, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            by_dest[item.decode_instance].append(i)
        broken: dict[int, str] = {}

        def on_link(dest: int, op: Callable[[KVLink], None]) -> None:
            if dest in broken:
                return
            link = links.get(dest)
            if link is None:
                broken[dest] = f"no KV link to decode replica {dest} on this rank"
                return
            try:
                op(link)
            except RuntimeError as e:  # gloo/NCCL: the peer closed or the group was torn down
                broken[dest] = f"KV link to decode replica {dest} failed: {e}"

        if self.sends_kv:
            for dest, idx in by_dest.items():
                header = self._header([items[i] for i in idx])
                on_link(dest, partial(KVLink.send_header, header=header))

        plans = {
            dest: wire_plan([ranges[i] for i in idx], self.block_size)
            for dest, idx in by_dest.items()
        }

        def send_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            # k, v: [T, kv_heads_local, head_dim] views for the whole packed batch
            for dest, plan in plans.items():
                if dest in broken:
                    continue
                wire = pack_layer(k, v, plan)
                on_link(dest, partial(KVLink.send_tensor, tensor=wire))

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
                tokens = torch.tensor([out.token_ids[i] for i in idx])
                on_link(dest, partial(KVLink.send_tensor, tensor=tokens))
        if self.sends_kv:
            for dest in by_dest:
                on_link(dest, KVLink.flush)
        return out, broken

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
            block_size=self.block_size,
            has_trailer=self.tp.rank == 0,
        )
