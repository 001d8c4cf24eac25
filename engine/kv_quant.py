"""K/V rows to and from the KV cache's storage format (see engine/kv_format.py).

A float cache stores rows as they are, in its dtype. A scaled cache (int8, float8_e4m3fn) stores
each (token, head) row x of ``head_dim`` values as one byte per value and a float16 scale s
after them, the row's absmax over its maximum code: s = absmax / 127 (int8, values rounded
to nearest) or absmax / 448 (fp8 e4m3, values rounded by the cast). The codes are x / s with the
float16-rounded s, so the round trip is within s / 2 per value for int8 and within 2**-4 of
|x| (plus s * 2**-10 in fp8's subnormal range) for fp8. A row is quantized from its own values
only: the same K/V give the same bytes whether a decode step writes them, a local prefill does,
or a prefill rank packs them for the wire, and an incremental write never rescales old tokens.

The cache tensor's dtype names its format, so the cache stays one tensor:
[..., head_dim] for a float format, [..., head_dim + 2] bytes for a scaled one.
"""

from __future__ import annotations

import torch

from pdserve.engine.kv_format import SCALE_BYTES, check_kv_dtype

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "int8": torch.int8,
}
_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
QMAX: dict[torch.dtype, float] = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
SCALE_DTYPE = torch.float16
_SCALE_MAX = torch.finfo(SCALE_DTYPE).max


def storage_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensor's dtype for a ``decode.kv_cache.dtype`` ("auto": the model's)."""
    return model_dtype if kv_dtype == "auto" else TORCH_DTYPES[check_kv_dtype(kv_dtype)]


def kv_dtype_name(dtype: torch.dtype) -> str:
    """The format's name (the header's spelling) for a cache tensor's dtype."""
    if dtype not in _NAMES:
        raise ValueError(f"{dtype} is not a KV cache format; use one of {', '.join(TORCH_DTYPES)}")
    return _NAMES[dtype]


def is_scaled(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def movable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor index_copy_ and index_fill_ accept (CPU has no float8 kernels for
    them): the same bytes as uint8 for a scaled format, else ``t`` itself."""
    return t.view(torch.uint8) if is_scaled(t.dtype) else t


def to_cache_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x: [..., head_dim] in the compute dtype (any strides) -> rows in storage format ``dtype``:
    [..., head_dim] (float: x itself when the dtypes agree) or [..., head_dim + 2] (scaled)."""
    if not is_scaled(dtype):
        return x.to(dtype)
    xf = x.float()
    absmax = xf.abs().amax(-1, keepdim=True)  # [..., 1]
    scale = (absmax / QMAX[dtype]).clamp(max=_SCALE_MAX).to(SCALE_DTYPE)
    s = scale.float()
    codes = xf / torch.where(s > 0, s, 1.0)  # an all-zero row (or an underflowed s): codes 0
    if dtype == torch.int8:
        q = codes.round_().clamp_(-127, 127).to(torch.int8)
    else:
        q = codes.clamp_(-448, 448).to(dtype)
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=-1).view(dtype)


def from_cache_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows in storage format -> [..., head_dim] values in compute ``dtype`` (float: ``rows``
    itself when the dtypes agree). A scaled format multiplies in float32, then casts."""
    if not is_scaled(rows.dtype):
        return rows.to(dtype)
    raw = rows.view(torch.uint8)
    head_dim = rows.shape[-1] - SCALE_BYTES
    q = raw[..., :head_dim].view(rows.dtype)
    scale = raw[..., head_dim:].view(SCALE_DTYPE)  # [..., 1]
    return (q.float() * scale.float()).to(dtype)
