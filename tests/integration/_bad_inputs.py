"""The bad-input corpus: what a hostile or careless client sends, and what it must get back.

Each case is (id, request, expected status, words the error message must hold). HTTP cases go
to one real deployment (tests/integration/test_bad_input_corpus.py), which must stay healthy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

C, CH = "/v1/completions", "/v1/chat/completions"
N = "/pdserve/v1"
JSON = {"content-type": "application/json"}
MSGPACK = {"content-type": "application/x-msgpack"}
OK_CHAT = [{"role": "user", "content": "Hi"}]


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: Any = None  # a dict is sent as JSON (OpenAI) or msgpack (native); bytes as they are
    status: int = 400
    words: tuple[str, ...] = ()
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)


def c(id: str, extra: dict[str, Any], words: tuple[str, ...], status: int = 400) -> Case:
    return Case(id, C, {"prompt": "Hi", "max_tokens": 2, **extra}, status, words)


def ch(id: str, extra: dict[str, Any], words: tuple[str, ...], status: int = 400) -> Case:
    return Case(id, CH, {"messages": OK_CHAT, "max_tokens": 2, **extra}, status, words)


def raw(id: str, path: str, data: bytes, words: tuple[str, ...], status: int = 400) -> Case:
    return Case(id, path, data, status, words)


def nat(id: str, route: str, body: Any, words: tuple[str, ...], status: int = 400) -> Case:
    data = body if isinstance(body, bytes) else msgpack.packb(body)
    return Case(id, N + route, data, status, words, headers=MSGPACK)


OPENAI = [
    c("tools-on-completions", {"tools": [{"type": "function"}]}, ("unrecognized", "tools")),
    ch("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, ("tools",)),
    ch("tool-choice", {"tool_choice": "required"}, ("tool_choice",)),
    ch("functions", {"functions": [{"name": "f"}]}, ("functions",)),
    ch("json-mode", {"response_format": {"type": "json_object"}}, ("response_format",)),
    ch("n-3", {"n": 3}, ("n=3", "n=1")),
    c("best-of", {"best_of": 2}, ("best_of",)),
    c("suffix", {"suffix": "end"}, ("suffix",)),
    c("echo", {"echo": True}, ("echo",)),
    c("beam", {"use_beam_search": True}, ("use_beam_search",)),
    c("prompt-logprobs", {"prompt_logprobs": 2}, ("prompt_logprobs",)),
    c("typo", {"temprature": 0.2}, ("temprature", "temperature")),
    ch(
        "tool-message",
        {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
        ("tool_call_id",),
    ),
    c("nan-temperature", {"temperature": float("nan")}, ("temperature", "finite")),
    c("inf-top-p", {"top_p": float("inf")}, ("top_p", "finite")),
    c("nan-rep-penalty", {"repetition_penalty": float("nan")}, ("repetition_penalty",)),
    c("neg-temperature", {"temperature": -1}, ("temperature",)),
    c("top-p-zero", {"top_p": 0}, ("top_p",)),
    c("string-temperature", {"temperature": "hot"}, ("temperature",)),
    c("max-tokens-zero", {"max_tokens": 0}, ("max_tokens",)),
    c("max-tokens-float", {"max_tokens": 2.5}, ("max_tokens",)),
    c("min-tokens-over-max", {"min_tokens": 5}, ("min_tokens", "max_tokens")),
    c("logit-bias-range", {"logit_bias": {"5": 1000}}, ("logit_bias", "[-100, 100]")),
    c("logit-bias-key", {"logit_bias": {"five": 1}}, ("logit_bias",)),
    c("logit-bias-vocab", {"logit_bias": {"99999999": 1}}, ("logit_bias", "vocabulary")),
    c("stop-too-many", {"stop": [f"s{i}" for i in range(5000)]}, ("stop", "at most 64")),
    c("stop-too-long", {"stop": ["x" * 10_000]}, ("stop", "512")),
    c("stop-empty", {"stop": [""]}, ("stop",)),
    c("stop-token-negative", {"stop_token_ids": [-1]}, ("stop_token_ids",)),
    c("logprobs-21", {"logprobs": 21}, ("logprobs",)),
    c("seed-huge", {"seed": 1 << 80}, ("seed",)),
    c("prompt-ids-out-of-vocab", {"prompt": [10**9]}, ("prompt", "token")),
    c("prompt-many", {"prompt": ["a", "b"]}, ("one prompt per request",)),
    c("prompt-too-long", {"prompt": [5] * 5000}, ("context", "shorten")),
    c("unknown-model", {"model": "gpt-4"}, ("gpt-4",), status=404),
    raw("lone-surrogate", C, b'{"prompt": "a\\ud800b", "max_tokens": 2}', ("surrogate",)),
    raw(
        "surrogate-in-chat",
        CH,
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        ("messages[0].content", "surrogate"),
    ),
    raw("not-json", C, b"{prompt: hi", ("not valid JSON",)),
    raw("json-array", C, b"[1, 2]", ("JSON object",)),
    raw("empty-body", C, b"", ("body",)),
    ch("no-messages", {"messages": []}, ("messages",)),
    ch(
        "image-part",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        ("image_url", "text"),
    ),
    Case("huge-body", C, b'{"prompt": "' + b"a" * (3 << 20) + b'"}', 413, ("limit",), "POST", JSON),
    Case("no-route", "/v2/nothing", None, 404, ("/v2/nothing",), "GET"),
    Case("wrong-method", C, None, 405, ("Method Not Allowed",), "GET"),
    Case("bad-results-query", N + "/jobs/x/results?start=-1", None, 400, ("start",), "GET"),
]

NATIVE = [
    nat("not-msgpack", "/generate", b"\xc1\xc1", ("not valid msgpack",)),
    nat("not-a-map", "/generate", [1, 2], ("msgpack map",)),
    nat("unknown-field", "/generate", {"prompt": "x", "tools": []}, ("unknown field", "tools")),
    nat(
        "both-prompt-and-messages",
        "/generate",
        {"prompt": "x", "messages": OK_CHAT},
        ("either prompt",),
    ),
    nat(
        "bad-sampling-key",
        "/generate",
        {"prompt": "x", "sampling": {"temp": 1}},
        ("unknown sampling parameter", "temp"),
    ),
    nat(
        "nan-in-sampling",
        "/generate",
        {"prompt": "x", "sampling": {"temperature": float("nan")}},
        ("temperature", "finite"),
    ),
    nat("sampling-not-map", "/stream", {"prompt": "x", "sampling": [1]}, ("sampling",)),
    nat("prompt-bool-ids", "/generate", {"prompt": [True]}, ("prompt", "token ids")),
    nat("request-id-long", "/generate", {"prompt": "x", "request_id": "r" * 500}, ("request_id",)),
    nat("ext-type", "/generate", msgpack.packb(msgpack.ExtType(5, b"x")), ("ext type",)),
    nat("job-empty", "/jobs", {"prompts": []}, ("non-empty",)),
    nat("job-bad-prompt", "/jobs", {"prompts": ["ok", {"p": 1}]}, ("prompts[1]",)),
    nat("job-name-long", "/jobs", {"prompts": ["ok"], "name": "n" * 500}, ("name",)),
    nat(
        "job-bias-vocab",
        "/jobs",
        {"prompts": ["ok"], "sampling": {"logit_bias": {"9999999": 1}}},
        ("logit_bias", "vocabulary"),
    ),
    Case("job-unknown", N + "/jobs/job-nope", None, 404, ("job-nope",), "GET"),
]
