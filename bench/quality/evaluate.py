"""Running `pdserve eval-ppl`'s settings: each loads the model as a worker would (dtype, weight
quantization), builds a paged KV cache in its KV dtype, and measures perplexity and greedy
agreement with the first (reference) setting."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from pdserve.bench.model_settings import Setting
from pdserve.bench.models import weight_bytes
from pdserve.bench.quality.agreement import Agreement, agreement, chat_prompt_ids, greedy_answers
from pdserve.bench.quality.ppl import BLOCK_SIZE, Perplexity, perplexity
from pdserve.bench.serve.prompts import load_passage
from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.runner import build_engine, model_limits
from pdserve.engine.builtin_models import builtin_path, is_builtin
from pdserve.engine.config import ModelConfig
from pdserve.engine.gguf_file import resolve_model_path
from pdserve.engine.kv_cache import allocate_kv_cache, bytes_per_block
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.tokenizer import apply_chat_template, load_tokenizer

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Row:
    setting: Setting
    perplexity: Perplexity
    reference_ppl: float
    agreement: Agreement | None
    weight_bytes: int
    kv_bytes_per_token: float
    answers: tuple[str, ...] = ()  # the greedy answers, decoded, in CHAT_PROMPTS order

    @property
    def change(self) -> float:
        """Perplexity over the reference's, minus one (0.02 = 2% worse)."""
        return self.perplexity.ppl / self.reference_ppl - 1

    @property
    def meets_bound(self) -> bool | None:
        bound = self.setting.bound
        return None if bound is None else self.change <= bound

    def to_json(self) -> dict[str, Any]:
        return {
            "setting": self.setting.label,
            **dataclasses.asdict(self.setting),
            "perplexity": self.perplexity.ppl,
            "tokens": self.perplexity.tokens,
            "seconds": self.perplexity.seconds,
            "change_vs_reference": self.change,
            "bound": self.setting.bound,
            "meets_bound": self.meets_bound,
            "agreement": None if self.agreement is None else dataclasses.asdict(self.agreement),
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "answers": list(self.answers),
        }


def evaluate(model: str, settings: Sequence[Setting], args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads)
    path = resolve_model_path(str(builtin_path(model)) if is_builtin(model) else model)
    tokenizer = load_tokenizer(path)
    ids = tokenizer.encode(load_passage(), add_special_tokens=False)
    prompts = chat_prompt_ids(lambda m: apply_chat_template(tokenizer, m))
    rows: list[Row] = []
    reference: list[list[int]] | None = None
    for setting in tqdm(settings, desc="eval-ppl", unit="setting"):
        lm = _load(path, setting)
        cache = _cache(lm, args.window, setting.kv)
        ppl = perplexity(lm, cache, ids, args.window, args.stride)
        agree, texts = None, tuple[str, ...]()
        if not args.no_agreement:
            answers = greedy_answers(_engine(lm, setting.kv, prompts), prompts, args.max_tokens)
            reference = reference or answers
            agree = agreement(reference, answers)
            texts = tuple(str(tokenizer.decode(a, skip_special_tokens=True)) for a in answers)
        ref_ppl = rows[0].perplexity.ppl if rows else ppl.ppl
        per_token = bytes_per_block(lm.config, 1, BLOCK_SIZE, setting.kv) / BLOCK_SIZE
        rows.append(Row(setting, ppl, ref_ppl, agree, weight_bytes(lm), per_token, texts))
    return rows


def _load(path: str, setting: Setting) -> CausalLM:
    config = ModelConfig.from_pretrained(
        path, dtype=setting.dtype, quantization=setting.quantization
    )
    return load_model(config, TPGroup.single(), CPU)


def _cache(model: CausalLM, tokens: int, kv: str) -> torch.Tensor:
    return allocate_kv_cache(model.config, 1, math.ceil(tokens / BLOCK_SIZE), BLOCK_SIZE, CPU, kv)


def _engine(model: CausalLM, kv: str, prompts: Sequence[list[int]]) -> DecodeEngine:
    longest = max(len(p) for p in prompts) + 64
    blocks = len(prompts) * math.ceil(longest / BLOCK_SIZE)
    limits = model_limits(
        model, blocks, BLOCK_SIZE, min(model.config.max_model_len, blocks * BLOCK_SIZE),
        max_num_seqs=len(prompts), max_num_batched_tokens=sum(map(len, prompts)),
    )  # fmt: skip
    return build_engine(model, limits, CPU, kv_dtype=kv)


def format_table(rows: Sequence[Row]) -> str:
    head = ("setting", "ppl", "vs ref", "bound", "agree", "tokens agree", "weights MB", "KV B/tok")
    body = []
    for r in rows:
        bound = "" if r.setting.bound is None else f"<= {r.setting.bound:.0%}: "
        bound += {True: "met", False: "NOT met", None: ""}[r.meets_bound]
        a = r.agreement
        body.append((
            r.setting.label, f"{r.perplexity.ppl:.3f}", f"{r.change:+.2%}", bound,
            "" if a is None else f"{a.identical}/{a.prompts}",
            "" if a is None else f"{a.token_share:.1%}",
            f"{r.weight_bytes / 1e6:.1f}", f"{r.kv_bytes_per_token:,.0f}",
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
