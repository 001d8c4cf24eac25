"""``pdserve make-tiny-model``: build the tiny random-weight checkpoint (``engine.tiny_model``).

torch and transformers load when it runs, not when its flags are built.
"""

from __future__ import annotations

import argparse

# engine.tiny_model.TINY_ARCHS, spelled out so `--help` does not import torch (a test keeps them equal)
TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
DESCRIPTION = (
    "Writes config.json, model.safetensors and a byte-level BPE tokenizer with a chat template; "
    "deterministic from the seed."
)


def add_args(command: str, p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("out_dir", help="directory to write")
    p.add_argument("--arch", choices=TINY_ARCHS, default="llama")
    p.add_argument("--seed", type=int, default=0)


def run(command: str, args: argparse.Namespace) -> int:
    from pdserve.engine.tiny_model import make_tiny_model

    print(make_tiny_model(args.out_dir, args.arch, args.seed))
    return 0
