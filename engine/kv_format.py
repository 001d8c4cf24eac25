"""The KV cache's storage formats by name, as the config and the transfer header spell them.

Torch-free: the header, the planner and the sizing rules speak these names. A float format
stores each (token, head) row of ``head_dim`` values as they are. A scaled format (``fp8_e4m3``,
``int8``) stores one byte per value, then the row's float16 scale in the row's last
``SCALE_BYTES`` bytes: a row is ``head_dim + SCALE_BYTES`` one-byte elements, so the cache, a
block and a wire tensor keep one layout and one tensor for every format
(engine/kv_quant.py does the arithmetic).
"""

from __future__ import annotations

# bytes per stored value
KV_DTYPES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8_e4m3": 1, "int8": 1}
SCALED = frozenset({"fp8_e4m3", "int8"})
SCALE_BYTES = 2  # one float16 scale per (token, head), after the row's values


def check_kv_dtype(name: str) -> str:
    if name not in KV_DTYPES:
        raise ValueError(f"KV cache dtype {name!r} is not one of {', '.join(KV_DTYPES)}")
    return name


def row_width(name: str, head_dim: int) -> int:
    """Elements of one stored (token, head) row: the values, then (scaled formats) the scale."""
    return head_dim + SCALE_BYTES if check_kv_dtype(name) in SCALED else head_dim


def row_bytes(name: str, head_dim: int) -> int:
    """Bytes of one (token, head) row of K or V, its scale included."""
    return row_width(name, head_dim) * KV_DTYPES[name]
