"""Opening a GGUF file with gguf-py and refusing, up front, the ones pdserve cannot serve.

Every check runs before any tensor is dequantized, so an unsupported file fails in a second
with a message naming the file, what it holds and what is supported, never halfway through a
conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
from gguf import GGMLQuantizationType as Q

from pdserve.engine.config import ModelLoadError

MAGIC = b"GGUF"
# general.architecture -> transformers model_type. llama.cpp writes Mistral models as llama.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# The formats gguf-py dequantizes that llama.cpp's usual quantizations (Q4_K_M, Q5_K_S, Q8_0,
# Q4_1, ...) are made of. The i-quants and ternary types are left out: untested here.
SUPPORTED_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)  # fmt: skip


def field(reader: gguf.GGUFReader, key: str) -> Any:
    """The value of metadata `key` (str, number, bool or list), or None when the file lacks it."""
    found = reader.get_field(key)
    return None if found is None else found.contents()


def is_gguf_file(path: Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic bytes."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def require_file(path: Path) -> Path:
    """`path`, if it is a file; else ModelLoadError."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    return path


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A reader over `path` (memory-mapped), after checking pdserve can serve what it holds."""
    if not is_gguf_file(require_file(path)):
        raise ModelLoadError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); point "
            "model.path at a llama.cpp .gguf file or a Hugging Face model directory"
        )
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"gguf cannot read {path}: {e}; the file may be truncated") from e
    check_supported(reader, path)
    return reader


def check_supported(reader: gguf.GGUFReader, path: Path) -> None:
    """Raise ModelLoadError for an architecture, a MoE, or a tensor type pdserve cannot serve."""
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path} holds a {arch!r} model; pdserve serves GGUF architectures "
            f"{', '.join(GGUF_ARCHITECTURES)} (llama.cpp writes Llama and Mistral checkpoints as "
            "llama, Qwen2/2.5 as qwen2, Qwen3 as qwen3)"
        )
    if field(reader, f"{arch}.expert_count"):
        raise ModelLoadError(
            f"{path} is a mixture-of-experts {arch} model; pdserve serves dense models only"
        )
    bad: dict[str, list[str]] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            bad.setdefault(tensor.tensor_type.name, []).append(tensor.name)
    if bad:
        found = "; ".join(
            f"{t} ({len(names)} tensors, e.g. {names[0]})" for t, names in bad.items()
        )
        raise ModelLoadError(
            f"{path} stores tensors in types pdserve cannot dequantize: {found}. Supported: "
            f"{', '.join(t.name for t in SUPPORTED_TYPES)}; pick a file quantized to one of "
            "those (e.g. Q4_K_M or Q8_0) or serve the Hugging Face checkpoint"
        )
