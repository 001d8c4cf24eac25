"""Serving a llama.cpp GGUF file: converted once into a Hugging Face directory, then reused.

pdserve's config, loader and tokenizer all read a Hugging Face directory, and every TP rank
reads its own slices of safetensors; a GGUF holds quantized blocks that cannot be sliced that
way. So the file is converted once per node into `cache_root/gguf-<stem>-<digest>/`:
config.json, generation_config.json, float32 model.safetensors under transformers' names, and
the tokenizer files with the chat template. Every later load, and every worker process on the
node, reuses that directory. The digest covers the file's resolved path, size and mtime and the
converter version, so an edited file or a fixed converter converts afresh.

Concurrent workers serialise on a lock file, so the node converts once; the converter writes
into a temporary directory beside the target and renames it, so a reader never sees half a
model, and a crashed conversion leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from pdserve.engine.built_dir import build_once
from pdserve.engine.envs import cache_dir
from pdserve.engine.gguf_convert import write_config, write_tensors, write_tokenizer
from pdserve.engine.gguf_reader import is_gguf_file, open_gguf, require_file

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 2  # bump when the output changes, so cached conversions are redone
MARKER = "pdserve_gguf.json"  # written last: a directory without it is not a finished conversion


def resolve_model_path(path: str, cache_root: Path | None = None) -> str:
    """`path` itself, or for a GGUF file the directory it converts to (converting on first use).

    cache_root defaults to `<pdserve cache dir>/gguf` ($PDSERVE_CACHE_DIR or ~/.cache/pdserve).
    """
    source = Path(path).expanduser()
    if source.is_dir() or (source.suffix.lower() != ".gguf" and not is_gguf_file(source)):
        return path
    return str(materialize_gguf(source, cache_root or cache_dir() / "gguf"))


def materialize_gguf(path: Path, cache_root: Path, progress: bool = True) -> Path:
    """The Hugging Face directory converted from GGUF file `path`, built under cache_root once.

    Raises ModelLoadError (before converting anything) for a path that is not a GGUF file, an
    architecture other than llama/qwen2/qwen3, or a tensor type outside SUPPORTED_TYPES.
    """
    source = require_file(path.expanduser().resolve())
    stat = source.stat()
    stamp = {
        "source": str(source),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
    }
    out = cache_root / f"gguf-{source.stem}-{cache_key(source)}"

    def convert(tmp: Path) -> None:
        _convert(tmp, source, progress)

    return build_once(out, MARKER, stamp, convert, "GGUF conversion", owned=True)


def cache_key(source: Path) -> str:
    """16 hex digits over the file's resolved path, size, mtime and the converter version."""
    stat = source.stat()
    identity = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0{CONVERTER_VERSION}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _convert(out: Path, source: Path, progress: bool) -> None:
    started = time.perf_counter()
    reader = open_gguf(source)  # every check, before anything is written
    logger.info("converting %s into %s (float32)", source, out)
    config = write_config(reader, source, out)
    write_tokenizer(reader, source, out)
    write_tensors(reader, config, source, out, progress)
    logger.info("converted %s in %.1f s", source.name, time.perf_counter() - started)
