"""Transfer descriptors: the msgpack metadata that precedes a batch of KV on a link.

A prefill rank sends, per batch and per destination decode replica, one *header* naming every
request in the batch bound there (the router-assigned transfer id is the only pairing key), then
one tensor per layer holding all those requests' K and V for the rank's head slice in the cache's
block layout and storage format (see layout.py; a scaled format's rows carry their scales), then
(from the rank that sampled them) a *trailer* with the first generated tokens.

A prompt's KV may come in several *parts* (chunked prefill: one per chunk that completes
blocks), each in the header of its own step, in prompt order on each link; only its ``last``
part carries its first token, and only then is the prompt's KV complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from pdserve.engine.kv_format import KV_DTYPES, row_width

# Bounded message size: a header for a batch of a few hundred requests is a few KiB.
MAX_HEADER_BYTES = 1 << 20
# 5: a prompt's KV may come in parts: an item says whether it is the prompt's last;
# 4: an item carries its first block: a prompt prefix the decode replica holds is not sent;
# 3: "dtype" is the KV cache's storage format (int8 and fp8_e4m3 rows carry their scales);
# 2: one block-layout tensor per layer; 1: K and V apart, per token
PROTOCOL_VERSION = 5


class TransferProtocolError(RuntimeError):
    """The peer sent bytes that are not a valid pdserve transfer header."""


@dataclass(frozen=True)
class TransferItem:
    """One request's part of a batched transfer: ``num_tokens`` of the prompt's tokens from
    position ``first_block * block_size`` on (the blocks before are cached on the decode replica,
    or came in earlier parts). ``last``: this part ends the prompt (the trailer has its first
    token); an earlier part of a chunked prefill covers whole blocks."""

    transfer_id: int
    request_id: str
    num_tokens: int  # prompt tokens whose K/V are in this transfer (the uncached part)
    block_ids: tuple[int, ...]  # destination blocks: the reservation's table from first_block on
    first_block: int = 0  # the prompt's block this part starts at
    last: bool = True  # the prompt's KV is complete with this part


@dataclass(frozen=True)
class TransferHeader:
    """What the receiver needs to post the layer receives and place the data."""

    items: tuple[TransferItem, ...]
    num_layers: int
    dtype: str  # the KV storage format (engine/kv_format.py): float32 ... fp8_e4m3, int8
    head_start: int  # KV heads [head_start, head_end) of the full model carried by this link
    head_end: int
    head_dim: int
    block_size: int  # the wire tensor's block size: the decode replica's
    has_trailer: bool  # this rank also sends a token per item: the first of each last part
    close: bool = False  # the sender is closing the link; nothing follows

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    @property
    def wire_layers(self) -> int:
        """Layer tensors that travel: none when no item sends a block (every prompt is cached
        on the decode replica; only the trailer follows)."""
        return self.num_layers if self.num_blocks else 0

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def num_blocks(self) -> int:
        return sum(-(-item.num_tokens // self.block_size) for item in self.items)

    @property
    def itemsize(self) -> int:
        return KV_DTYPES[self.dtype]

    def layer_shape(self) -> tuple[int, int, int, int, int]:
        # per layer: [blocks of all items, 2 (K, V), block_size, heads of this slice, row]
        # (row: head_dim values, + 2 scale bytes in a scaled format)
        row = row_width(self.dtype, self.head_dim)
        return (self.num_blocks, 2, self.block_size, self.num_heads, row)

    def layer_bytes(self) -> int:
        n, kv, bs, heads, row = self.layer_shape()
        return n * kv * bs * heads * row * self.itemsize

    def encode(self) -> bytes:
        body = {
            "v": PROTOCOL_VERSION,
            "items": [
                [
                    i.transfer_id,
                    i.request_id,
                    i.num_tokens,
                    list(i.block_ids),
                    i.first_block,
                    i.last,
                ]
                for i in self.items
            ],
            "layers": self.num_layers,
            "dtype": self.dtype,
            "heads": [self.head_start, self.head_end, self.head_dim],
            "block_size": self.block_size,
            "trailer": self.has_trailer,
            "close": self.close,
        }
        data: bytes = msgpack.packb(body, use_bin_type=True)
        if len(data) > MAX_HEADER_BYTES:
            raise TransferProtocolError(
                f"transfer header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}; "
                "lower the prefill batch size"
            )
        return data

    @classmethod
    def decode(cls, data: bytes) -> TransferHeader:
        if len(data) > MAX_HEADER_BYTES:
            raise TransferProtocolError(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0)
            if body["v"] != PROTOCOL_VERSION:
                raise TransferProtocolError(
                    f"KV transfer protocol version {body['v']} from the prefill rank, this "
                    f"decode replica speaks {PROTOCOL_VERSION}: run one pdserve version in "
                    "both pools"
                )
            items = tuple(
                TransferItem(
                    int(t), str(r), int(n), tuple(int(b) for b in blocks), int(first), bool(last)
                )
                for t, r, n, blocks, first, last in body["items"]
            )
            start, end, head_dim = (int(x) for x in body["heads"])
            if body["dtype"] not in KV_DTYPES:
                raise ValueError(f"unknown KV dtype {body['dtype']!r}")
            return cls(
                items=items,
                num_layers=int(body["layers"]),
                dtype=str(body["dtype"]),
                head_start=start,
                head_end=end,
                head_dim=head_dim,
                block_size=int(body["block_size"]),
                has_trailer=bool(body["trailer"]),
                close=bool(body["close"]),
            )
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as e:
            raise TransferProtocolError(f"malformed transfer header: {e}") from e

    @classmethod
    def closing(cls) -> TransferHeader:
        return cls((), 0, "float32", 0, 0, 0, 1, has_trailer=False, close=True)
