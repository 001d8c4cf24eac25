"""RoPE scaling of a GGUF file, as transformers' `rope_scaling` dict.

llama.cpp states linear and YaRN scaling in metadata (`{arch}.rope.scaling.*`), but writes Llama
3's frequency-dependent scaling as a tensor, `rope_freqs.weight`: one divisor per rotary frequency.
transformers' GGUF loader ignores both, so a Llama 3.1 file loads there with plain RoPE. Here the
llama3 parameters are recovered from the divisors and checked by recomputing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from pdserve.engine.config import ModelLoadError
from pdserve.engine.gguf_reader import field

ROPE_FREQS = "rope_freqs.weight"
LLAMA3_CONTEXT = 8192  # Llama 3's pre-training context, the original_max_position_embeddings


def rope_scaling(
    reader: gguf.GGUFReader, arch: str, head_dim: int, theta: float, path: Path
) -> dict[str, Any] | None:
    """The file's RoPE scaling (None for plain RoPE); unsupported kinds raise ModelLoadError."""
    kind = field(reader, f"{arch}.rope.scaling.type") or "none"
    factor = field(reader, f"{arch}.rope.scaling.factor")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None and kind == "none":
        context = int(field(reader, f"{arch}.context_length"))
        divisors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        return llama3_from_divisors(divisors, theta, head_dim, context, path)
    if kind == "none":
        return None
    if kind == "linear" and freqs is None:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and freqs is None:
        original = field(reader, f"{arch}.rope.scaling.original_context_length")
        out = {"rope_type": "yarn", "factor": float(factor)}
        if original is not None:
            out["original_max_position_embeddings"] = int(original)
        for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if (value := field(reader, f"{arch}.rope.scaling.{theirs}")) is not None:
                out[ours] = float(value)
        return out
    raise ModelLoadError(
        f"{path} scales RoPE by {kind!r}{' with ' + ROPE_FREQS if freqs is not None else ''}; "
        "pdserve reads linear and yarn scaling and Llama 3's rope_freqs from GGUF files"
    )


def llama3_divisors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """rope_freqs as llama.cpp's converter computes them from transformers' llama3 parameters."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    factor, context = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = np.clip((context / wavelen - low) / (high - low), 0.0, 1.0)  # 1: high frequency
    return 1.0 / ((1 - smooth) / factor + smooth)


def llama3_from_divisors(
    divisors: np.ndarray, theta: float, head_dim: int, context: int, path: Path
) -> dict[str, Any] | None:
    """llama3 parameters reproducing `divisors` (1 at high frequencies, `factor` at low ones).

    Between the two, 1/divisor blends linearly in 1/wavelength, so a line through those points
    fixes the two band edges. Only their ratios to original_max_position_embeddings matter, so
    that is set to Llama 3's 8192 (the value in every Llama 3.x release).
    """
    if np.allclose(divisors, 1.0):
        return None
    factor = float(divisors.max())
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (1 / divisors.astype(np.float64) - 1 / factor) / (1 - 1 / factor)
    between = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    original = LLAMA3_CONTEXT if context > LLAMA3_CONTEXT else max(1, round(context / factor))
    scaling: dict[str, Any] = {"rope_type": "llama3", "factor": factor}
    if len(divisors) == len(inv_freq) and between.sum() >= 2:
        # smooth = original / (wavelength * (high - low)) - low / (high - low)
        slope, intercept = np.polyfit(inv_freq[between] / (2 * np.pi), smooth[between], 1)
        span = original / slope
        scaling |= {
            "low_freq_factor": round(float(-intercept * span), 6),
            "high_freq_factor": round(float((1 - intercept) * span), 6),
            "original_max_position_embeddings": original,
        }
        if np.allclose(llama3_divisors(scaling, theta, head_dim), divisors, rtol=1e-3):
            return scaling
    raise ModelLoadError(
        f"{path} holds a {ROPE_FREQS} tensor that is not Llama 3 RoPE scaling pdserve can "
        "reproduce; serve the original Hugging Face checkpoint instead"
    )
