"""One benchmark run in-process: plan the requests, send them, summarize.

`await run_benchmark(BenchConfig(...))` is what `pdserve bench` and the sweeps call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from pdserve.bench.serve.arrivals import request_arrivals
from pdserve.bench.serve.conversation import reuse_texts
from pdserve.bench.serve.load import LoadSettings, PlannedRequest, run_load
from pdserve.bench.serve.metrics import LATENCY_METRICS, BenchSummary, RequestRecord, summarize
from pdserve.bench.serve.prompts import TextPrompts, prompt_token_ids
from pdserve.bench.serve.server_cache import CacheCounters, scrape_cache
from pdserve.bench.serve.tokens import TextTokens, TokenizerNotFound, find_tokens
from pdserve.bench.serve.workloads import (
    TraceWorkload,
    Workload,
    WorkloadError,
    clip_to_context,
    parse_workload,
)

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
GREEDY = 0.0  # vLLM's bench sends temperature 0 unless --temperature is given


class BenchError(RuntimeError):
    """The benchmark cannot run against this server; the message says what to change."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: the server, the workload, the traffic, the SLOs."""

    base_url: str = "http://127.0.0.1:8000"
    workload: str | Workload = "fixed:in=256,out=64"
    model: str | None = None  # None: the first model /v1/models lists
    request_rate: float = math.inf  # req/s; inf: everything at t = 0
    burstiness: float = 1.0  # gamma shape of inter-arrival gaps; 1 = Poisson
    num_prompts: int = 1000
    max_concurrency: int | None = None
    goodput_ms: Mapping[str, float] = field(default_factory=dict)  # {"ttft": 500, "tpot": 50}
    seed: int = 0
    api_key: str | None = None
    max_model_len: int | None = None  # None: from /v1/models (no clipping if it says nothing)
    endpoint: str = COMPLETIONS  # or CHAT
    temperature: float | None = None  # None: GREEDY, as vLLM's bench
    top_p: float | None = None  # None: not sent (the server's default)
    top_k: int | None = None  # None: not sent (the server's default)
    tokenizer: str | None = None  # for text prompts; None: the served model's, if found
    percentiles: tuple[float, ...] = (99.0,)
    percentile_metrics: tuple[str, ...] = LATENCY_METRICS
    token_id_range: tuple[int, int] = (16, 512)  # prompt ids drawn from [low, high)
    num_warmups: int = 0
    request_timeout_s: float = 600.0
    max_duration_s: float | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise BenchError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.endpoint not in (COMPLETIONS, CHAT):
            raise BenchError(
                f"--endpoint {self.endpoint}: the bench speaks {COMPLETIONS} (prompts) or "
                f"{CHAT} (messages); choose one of them"
            )
        self._check_sampling()
        unknown = [m for m in self.percentile_metrics if m not in LATENCY_METRICS]
        if unknown:
            raise BenchError(
                f"--percentile-metrics {','.join(unknown)}: choose from {','.join(LATENCY_METRICS)}"
            )

    def _check_sampling(self) -> None:
        if self.temperature is not None and not self.temperature >= 0:
            raise BenchError(f"--temperature {self.temperature}: use 0 (greedy) or more")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise BenchError(f"--top-p {self.top_p}: must be in (0, 1]; 1 disables it")
        if self.top_k is not None and self.top_k < -1:
            raise BenchError(f"--top-k {self.top_k}: use -1 or 0 to disable, or a count")

    @property
    def chat(self) -> bool:
        return self.endpoint == CHAT

    @property
    def sampling(self) -> dict[str, float | int]:
        """The sampling fields every request carries: temperature (GREEDY unless given),
        top_p and top_k only when given."""
        temperature = GREEDY if self.temperature is None else self.temperature
        given = {"top_p": self.top_p, "top_k": self.top_k}
        return {"temperature": temperature, **{k: v for k, v in given.items() if v is not None}}

    @property
    def root_url(self) -> str:
        """The server root: trailing slashes and a trailing /v1 are dropped."""
        url = self.base_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class BenchResult:
    """What a run produced: the summary, every request's record and the --save-result JSON."""

    summary: BenchSummary
    records: list[RequestRecord]
    result: dict[str, Any]

    def save(self, result_path: Path | None, records_path: Path | None) -> None:
        for path in (result_path, records_path):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        if result_path is not None:
            result_path.write_text(json.dumps(self.result, indent=2) + "\n")
        if records_path is not None:
            slos = self.summary.slos_ms
            with records_path.open("w") as f:
                for record in self.records:
                    f.write(json.dumps(record.to_json(slos)) + "\n")


async def run_benchmark(config: BenchConfig) -> BenchResult:
    """Plan the requests, send them, summarize. Raises BenchError/WorkloadError on bad input."""
    workload = (
        parse_workload(config.workload) if isinstance(config.workload, str) else config.workload
    )
    if workload.replays_timestamps and not math.isinf(config.request_rate):
        raise WorkloadError(
            f"--workload {workload.spec!r} replays the trace's timestamps, so --request-rate "
            "does not apply: drop --request-rate, or add ,timestamps=false to the workload"
        )
    if config.model is None or config.max_model_len is None:
        model, max_len = await discover_model(config)
        config = replace(
            config, model=config.model or model, max_model_len=config.max_model_len or max_len
        )
    assert config.model is not None
    tokens = _text_tokens(config, workload)
    planned = plan_requests(config, workload, tokens)
    settings = LoadSettings(
        url=config.root_url + config.endpoint,
        model=config.model,
        chat=config.chat,
        sampling=config.sampling,
        api_key=config.api_key,
        max_concurrency=config.max_concurrency,
        request_timeout_s=config.request_timeout_s,
        max_duration_s=config.max_duration_s,
        show_progress=config.show_progress,
    )
    if config.num_warmups > 0:
        warm = [replace(planned[0], index=-1 - i, arrival_s=0.0) for i in range(config.num_warmups)]
        await run_load(warm, replace(settings, show_progress=False, max_duration_s=None))
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    before = await scrape_cache(config.root_url, headers)
    records, duration = await run_load(planned, settings)
    after = await scrape_cache(config.root_url, headers)
    summary = summarize(records, duration, config.goodput_ms, config.percentiles)
    result = {
        **_metadata(config, workload, tokens),
        **summary.to_json(config.percentile_metrics),
        **_prefix_reuse(records, before, after),
    }
    return BenchResult(summary, records, result)


def _prefix_reuse(
    records: list[RequestRecord], before: CacheCounters | None, after: CacheCounters | None
) -> dict[str, Any]:
    """What the server reports of prefix reuse: cached prompt tokens of the successful requests
    (OpenAI's usage.prompt_tokens_details.cached_tokens) summed, and its counters over the run
    (`server_cache`: prefix-cache queries and hits by pool, prefill tokens computed and cached,
    KV bytes sent and reused); each only when the server reports it."""
    out: dict[str, Any] = {}
    cached = [r.cached_tokens for r in records if r.success and r.cached_tokens is not None]
    if cached:
        out["total_cached_prompt_tokens"] = sum(cached)
    if before is not None and after is not None:
        out.update(after.minus(before).to_json())
    return out


def _text_tokens(config: BenchConfig, workload: Workload) -> TextTokens | None:
    """The tokenizer text prompts are sized with; None when the prompts are token ids."""
    if not (workload.text or config.chat):
        return None
    assert config.model is not None
    try:
        return find_tokens(config.tokenizer, config.model, config.chat)
    except TokenizerNotFound as exc:
        raise BenchError(str(exc)) from None


async def discover_model(config: BenchConfig) -> tuple[str, int | None]:
    """(model id, max_model_len or None) from the server's /v1/models."""
    url = config.root_url + "/v1/models"
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        async with httpx.AsyncClient(timeout=30.0) as client:
            resp = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {url} ({exc!r}): is the server up? check --url") from exc
    if resp.status_code != 200:
        raise BenchError(
            f"GET {url} answered {resp.status_code}: {resp.text[:300]}; "
            "check --url and --api-key, or pass both --model and --max-model-len"
        )
    models = resp.json().get("data") or []
    if not models:
        raise BenchError(f"{url} lists no model: pass --model")
    card = models[0]
    max_len = card.get("max_model_len")
    return str(card["id"]), int(max_len) if max_len is not None else None


def plan_requests(
    config: BenchConfig, workload: Workload, tokens: TextTokens | None = None
) -> list[PlannedRequest]:
    """Lengths, arrival times and prompts of every request; deterministic in config.seed.

    Prompts are token ids unless the workload asks for text or the endpoint is chat; text is
    sized with `tokens` (default: the words estimate). Shapes that share prefixes become a
    system prompt per group and a message per request (`bench.serve.conversation`)."""
    n = config.num_prompts
    length_seed, arrival_seed, prompt_seed = (
        int(s) for s in np.random.SeedSequence(config.seed).generate_state(3)
    )
    shapes = clip_to_context(workload.sample(n, length_seed), config.max_model_len)
    if isinstance(workload, TraceWorkload) and workload.replays_timestamps:
        arrivals = workload.arrival_times(n)
    else:
        follows = [s.follows for s in shapes]
        arrivals = request_arrivals(follows, config.request_rate, config.burstiness, arrival_seed)
    if any(s.reuses for s in shapes):  # text sharing prefixes, as the shapes say
        reuse = reuse_texts(shapes, TextPrompts(tokens or TextTokens()), prompt_seed)
        return [
            PlannedRequest(i, t, message, s.output_len, planned, system, s.follows)
            for i, (s, t, (system, message, planned)) in enumerate(zip(shapes, arrivals, reuse))
        ]
    lengths = [s.input_len for s in shapes]
    if workload.text or config.chat:
        texts = TextPrompts(tokens or TextTokens()).make(lengths, prompt_seed)
        return [
            PlannedRequest(i, t, p.text, s.output_len, p.tokens)
            for i, (s, t, p) in enumerate(zip(shapes, arrivals, texts))
        ]
    prompts = prompt_token_ids(lengths, prompt_seed, config.token_id_range)
    return [
        PlannedRequest(i, t, ids, s.output_len)
        for i, (s, t, ids) in enumerate(zip(shapes, arrivals, prompts))
    ]


def _metadata(config: BenchConfig, workload: Workload, tokens: TextTokens | None) -> dict[str, Any]:
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        "base_url": config.root_url,
        "model_id": config.model,
        "endpoint": config.endpoint,
        "workload": workload.spec,
        "prompts": "token ids" if tokens is None else "text",
        "tokenizer": None if tokens is None else tokens.name,
        "sampling_params": {**config.sampling, "ignore_eos": True},
        "max_model_len": config.max_model_len,
        "num_prompts": config.num_prompts,
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "seed": config.seed,
    }
