"""Identities of full KV blocks for prefix caching, chained as vLLM v1 chains them.

Block i of a sequence is identified by a hash over its ``block_size`` token ids and the hash of
block i - 1, so two sequences share block i's hash exactly when they share every token up to
its end: equal hashes mean equal KV. The chain starts from a salt over everything else that
changes the KV (the model, the KV cache format, the block size), so caches of different
settings never alias. blake2b over packed integers, not Python's ``hash``: the router, the
prefill ranks and the decode replicas compute the same values in different processes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_DIGEST = 8  # bytes: a 64-bit identity; collisions are astronomically unlikely at cache sizes


def hash_salt(model: str, kv_dtype: str, block_size: int) -> int:
    """The chain's root for one model, KV format and block size."""
    text = f"pdserve-prefix-v1\0{model}\0{kv_dtype}\0{block_size}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=_DIGEST).digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, salt: int, start: int = 0) -> list[int]:
    """Hashes of the full blocks of ``token_ids`` from block ``start`` on (a partial last block
    has none). ``salt`` seeds block 0; for ``start > 0`` the chain is recomputed from block 0."""
    out: list[int] = []
    parent = salt
    for i in range(len(token_ids) // block_size):
        block = token_ids[i * block_size : (i + 1) * block_size]
        data = struct.pack(f"<Q{block_size}q", parent, *block)
        parent = int.from_bytes(hashlib.blake2b(data, digest_size=_DIGEST).digest(), "little")
        if i >= start:
            out.append(parent)
    return out
