"""Greedy parity with transformers on the real default model, on a GPU, in bfloat16 and float32:
``make gpu-check``'s parity step.

pdserve answers the 20 chat prompts of ``bench.quality.agreement`` through its decode engine
(each prompt prefilled into the paged KV cache, then batched decode steps, as a decode replica
serves them: ``greedy_answers``); transformers answers each prompt alone with ``generate`` (no
padding) in the same dtype on the same device. Both stop at the model's end-of-turn ids or after
--max-tokens. The figures: tokens matched (each answer's common prefix with transformers',
summed, as ``agreement`` counts them) over transformers' tokens, and answers identical.

Two implementations round differently, so a greedy answer may turn where the top two logits
are all but tied. At each answer's first difference transformers' own logits are read: the gap
between its choice and pdserve's is how far pdserve's logits must have moved to choose
otherwise. The step fails when a gap exceeds the dtype's tolerance (``TIE_LOGITS``): pdserve
then computed something else, not the same thing rounded differently.

    python -m pdserve.bench.gpu_check_parity                       # cuda, the default model
    python -m pdserve.bench.gpu_check_parity --device cpu --model tiny --dtypes float32
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from pdserve.bench.gpu_check_runner import write_result
from pdserve.bench.models import load_hf, resolve_model
from pdserve.bench.quality.agreement import agreement, chat_prompt_ids, greedy_answers
from pdserve.decode_worker.engine import DecodeEngine
from pdserve.decode_worker.runner import build_engine, model_limits
from pdserve.engine.config import ModelConfig
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.tokenizer import apply_chat_template, load_tokenizer

# the largest logit gap (transformers' choice over pdserve's, in transformers' logits) taken
# for a near-tie: float32 differs between implementations in the 4th-5th digit; bfloat16 keeps
# 8 bits of mantissa, and its rounding compounds over the layers
TIE_LOGITS = {"float32": 0.05, "bfloat16": 1.0, "float16": 0.5}
BLOCK_SIZE = 16


@dataclass
class Parity:
    """One dtype's comparison."""

    dtype: str
    prompts: int
    identical: int
    matched_tokens: int
    reference_tokens: int
    tolerance: float
    divergences: list[dict[str, Any]] = field(default_factory=list)  # prompt, at, gap
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(d["gap"] is not None and d["gap"] <= self.tolerance for d in self.divergences)

    @property
    def max_gap(self) -> float | None:
        gaps = [d["gap"] for d in self.divergences if d["gap"] is not None]
        return max(gaps) if gaps else None

    def line(self) -> str:
        gap = "" if self.max_gap is None else f", largest gap {self.max_gap:.3g}"
        return (
            f"{self.dtype} {self.matched_tokens}/{self.reference_tokens} tokens "
            f"({self.identical}/{self.prompts} identical{gap})"
        )


def compare(path: str, dtype: str, device: torch.device, max_tokens: int) -> Parity:
    """pdserve's and transformers' greedy answers to the chat prompts, in ``dtype``."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(path)
    prompts = chat_prompt_ids(lambda m: apply_chat_template(tokenizer, m))
    config = ModelConfig.from_pretrained(path, dtype=dtype, device=device.type)
    model = load_model(config, TPGroup.single(), device)
    ours = greedy_answers(_engine(model, prompts, max_tokens, device), prompts, max_tokens)
    del model
    hf = load_hf(Path(path), dtype)
    hf.to(device)  # type: ignore[arg-type]  # transformers' wrapper of .to mistypes its self
    eos = list(config.eos_token_ids)
    theirs = [_hf_greedy(hf, p, max_tokens, eos, device) for p in prompts]
    a = agreement(theirs, ours)
    result = Parity(
        dtype, a.prompts, a.identical, a.agreed_tokens, a.reference_tokens, TIE_LOGITS[dtype]
    )
    for i, (prompt, ref, got) in enumerate(zip(prompts, theirs, ours, strict=True)):
        at = first_difference(ref, got)
        if at is not None:
            gap = _gap(hf, prompt + ref[:at], ref, got, at, device)
            result.divergences.append({"prompt": i, "at": at, "gap": gap})
    result.seconds = time.perf_counter() - start
    return result


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where the two answers differ (one ending first counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _engine(
    model: CausalLM, prompts: list[list[int]], max_tokens: int, device: torch.device
) -> DecodeEngine:
    longest = max(len(p) for p in prompts) + max_tokens
    blocks = len(prompts) * math.ceil(longest / BLOCK_SIZE)
    limits = model_limits(
        model, blocks, BLOCK_SIZE, min(model.config.max_model_len, blocks * BLOCK_SIZE),
        max_num_seqs=len(prompts), max_num_batched_tokens=sum(map(len, prompts)),
    )  # fmt: skip
    # one padded size holds the whole batch: one flex compile and CUDA graph, not one per size
    return build_engine(model, limits, device, cudagraph_capture_sizes=[len(prompts)])


@torch.inference_mode()
def _hf_greedy(
    hf: PreTrainedModel, prompt: list[int], max_tokens: int, eos: list[int], device: torch.device
) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    out = hf.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_tokens,
        eos_token_id=eos or None,  # the ids pdserve stops at, not generation_config's
        pad_token_id=eos[0] if eos else 0,
    )
    return [int(t) for t in out[0, len(prompt) :].tolist()]


@torch.inference_mode()
def _gap(
    hf: PreTrainedModel,
    context: list[int],
    ref: list[int],
    got: list[int],
    at: int,
    device: torch.device,
) -> float | None:
    """transformers' logit of its token at ``at`` minus that of pdserve's (None: one answer
    ended there, so there is no pair of tokens to weigh)."""
    if at >= len(ref) or at >= len(got):
        return None
    logits = hf(input_ids=torch.tensor([context], device=device), logits_to_keep=1).logits
    last = logits[0, -1].float()
    return float(last[ref[at]] - last[got[at]])


def markdown(results: Sequence[Parity], max_tokens: int) -> str:
    lines = [
        f"20 chat prompts, greedy, up to {max_tokens} tokens; transformers is the reference.",
        "",
        "| dtype | tokens matched | answers identical | largest logit gap | tolerance | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        gap = "" if r.max_gap is None else f"{r.max_gap:.3g}"
        lines.append(
            f"| {r.dtype} | {r.matched_tokens}/{r.reference_tokens} | "
            f"{r.identical}/{r.prompts} | {gap} | {r.tolerance:g} | "
            f"{'ties only' if r.ok else 'DIVERGES'} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.gpu_check_parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="bench.models name (default smollm2)")
    p.add_argument("--device", default="cuda", help="torch device of both sides (default cuda)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=TIE_LOGITS)
    p.add_argument("--max-tokens", type=int, default=32, help="answer length cap (default 32)")
    p.add_argument("--result", help="write the figures here as JSON (gpu_check's step result)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path, device = str(resolve_model(args.model)), torch.device(args.device)
    results: list[Parity] = []
    for dtype in args.dtypes:  # the result is rewritten after each: a cut-short run keeps it
        results.append(compare(path, dtype, device, args.max_tokens))
        print(f"{results[-1].line()} in {results[-1].seconds:.1f} s", flush=True)
        if args.result:
            write_result(args.result, _result(results, args.max_tokens))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = all(r.ok for r in results)
    print(_result(results, args.max_tokens)["summary"])
    return 0 if ok else 1


def _result(results: Sequence[Parity], max_tokens: int) -> dict[str, Any]:
    summary = "; ".join(r.line() for r in results)
    if not all(r.ok for r in results):
        summary = f"a divergence beyond a near-tie: {summary}"
    return {
        "summary": summary,
        "markdown": markdown(results, max_tokens),
        "dtypes": [asdict(r) | {"ok": r.ok} for r in results],
    }


if __name__ == "__main__":
    raise SystemExit(main())
