"""A model setting to evaluate: serving dtype, weight quantization, KV-cache dtype, and the
quality bound that applies to it. Plain data (the CLI parses settings without torch)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8", "int4")
KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8_e4m3", "int8")


@dataclass(frozen=True)
class Setting:
    dtype: str = "float32"
    quantization: str = "none"
    kv: str = "auto"

    @property
    def label(self) -> str:
        parts = [self.dtype]
        if self.quantization != "none":
            parts.append(f"quantization={self.quantization}")
        if self.kv != "auto":
            parts.append(f"kv={self.kv}")
        return ",".join(parts)

    @property
    def bound(self) -> float | None:
        """Largest perplexity increase over the float32 reference this setting may show:
        10% with 4-bit weights, else 2% with int8 weights or a compressed KV cache."""
        if self.quantization == "int4":
            return 0.10
        if self.quantization == "int8" or self.kv in ("fp8_e4m3", "int8"):
            return 0.02
        return None


DEFAULT_SETTINGS = (
    Setting(),
    Setting("bfloat16"),
    Setting(quantization="int8"),
    Setting(quantization="int4"),
    Setting(kv="fp8_e4m3"),
    Setting(kv="int8"),
)


def parse_setting(text: str) -> Setting:
    """``DTYPE[,quantization=Q][,kv=KV]`` -> Setting (argparse type: errors name the fix)."""
    dtype, *rest = [p.strip() for p in text.split(",")]
    values = {"dtype": dtype}
    for part in rest:
        key, sep, value = part.partition("=")
        if not sep or key not in ("quantization", "kv"):
            raise argparse.ArgumentTypeError(
                f"{part!r} in {text!r}: write quantization=Q or kv=KV after the dtype"
            )
        values[key] = value
    for key, choices in (("dtype", DTYPES), ("quantization", QUANTIZATIONS), ("kv", KV_DTYPES)):
        if key in values and values[key] not in choices:
            raise argparse.ArgumentTypeError(
                f"{key} {values[key]!r} in {text!r}: choose one of {', '.join(choices)}"
            )
    return Setting(**values)
