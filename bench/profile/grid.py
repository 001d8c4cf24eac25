"""What `pdserve profile` measures and how it repeats: the `Grid` of prefill compositions,
decode points, transfer sizes and chunked steps, and interleaved repeats reduced to medians.

Plain Python and numpy (no torch): `profile.runner` walks the grid with the real engine code.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PREFILL_LENGTHS = (16, 64, 256, 1024, 4096)
DECODE_CONTEXTS = (32, 128, 512, 2048)
DENSE_BATCHES = 32  # decode batch sizes measured one by one up to this
TRANSFER_MIB = (0.25, 1, 4, 16, 64)  # one transfer's KV bytes, whatever the model's size


@dataclass(frozen=True)
class Grid:
    """What to measure: prefill batch compositions, decode (batch, context) points, transfer
    sizes (tokens of KV), and the compositions timed again while sending KV."""

    prefill: list[list[int]]
    decode: list[tuple[int, int]]
    transfer: list[int]
    send: list[list[int]]
    mixed: list[tuple[int, int, int, int]]  # (batch, context, chunk start, chunk length)
    repeats: int
    decode_steps: int

    @classmethod
    def build(
        cls,
        max_tokens: int,
        max_len: int,
        max_batch: int,
        max_seqs: int,
        kv_bytes_per_token: int,
        quick: bool,
    ) -> Grid:
        """Prefill: n prompts of length L for L in PREFILL_LENGTHS and n = 1, 2, 4, ... within
        the token budget, plus three mixed batches; decode: batch 1, 2, 4, ... x contexts and
        every batch size up to DENSE_BATCHES at a context near 128; transfers of TRANSFER_MIB
        each."""
        lens = [n for n in PREFILL_LENGTHS if n < max_len and n <= max_tokens]
        counts = [1 << i for i in range(12) if (1 << i) <= max_batch]
        prefill = [[n] * k for n in lens for k in counts if n * k <= max_tokens]
        rng = np.random.default_rng(0)
        for size in (3, 6, 12):
            lens_mix = [int(x) for x in rng.integers(8, max(9, min(max_len - 1, 1024)), size)]
            while sum(lens_mix) > max_tokens and len(lens_mix) > 1:
                lens_mix.pop()
            prefill.append(lens_mix)
        steps = 3 if quick else 8
        contexts = [c for c in DECODE_CONTEXTS if c + steps + 2 < max_len]
        batches = [1 << i for i in range(12) if (1 << i) <= max_seqs]
        decode = [(b, c) for b in batches for c in contexts]
        # every other batch size up to DENSE_BATCHES at one context: a step's cost is not
        # monotonic in the batch on CPU BLAS (measured: batch 3 slower than 4, 6-7 than 8)
        mid = min(contexts, key=lambda c: abs(c - 128)) if contexts else None
        if mid is not None and not quick:
            dense = range(1, min(max_seqs, DENSE_BATCHES) + 1)
            decode += [(b, mid) for b in dense if b not in batches]
        transfer = [max(1, round(mib * 2**20 / kv_bytes_per_token)) for mib in TRANSFER_MIB]
        send = [c for c in ([256], [64] * 4, [1024]) if sum(c) <= max_tokens and max(c) < max_len]
        mixed = [
            (b, c, s, n)
            for b, c, s, n in ((8, 256, 0, 128), (8, 256, 256, 128), (4, 512, 0, 512))
            if b <= max_seqs and max(c, s + n) + steps + 2 < max_len and n <= max_tokens
        ]
        if quick:
            prefill = [c for c in prefill if sum(c) <= 256][:10]
            decode = [(b, c) for b, c in decode if b <= 8 and c <= 128]
            transfer, send, mixed = transfer[:4], send[:1] or [[min(16, max_len - 1)]], mixed[:1]
        repeats = 1 if quick else 3
        return cls(prefill, decode, transfer, send or [[lens[0]]], mixed, repeats, steps)


def median_by_key(samples: Sequence[tuple[Any, float]]) -> list[tuple[Any, float]]:
    """Median ms per key, keys in first-seen order (repeats were interleaved)."""
    groups: dict[Any, list[float]] = {}
    for key, ms in samples:
        groups.setdefault(key, []).append(ms)
    return [(key, statistics.median(v)) for key, v in groups.items()]


def interleaved(
    keys: Sequence[Any], repeats: int, measure: Callable[[Any], float], tick: Callable[[], None]
) -> list[tuple[Any, float]]:
    """Every key once per round, `repeats` rounds: load changes hit all keys alike."""
    out = []
    for _ in range(repeats):
        for key in keys:
            out.append((key, measure(key)))
            tick()
    return out


def cpu_count() -> int:
    return os.cpu_count() or 1
