"""The strict OpenAI API: unimplemented fields that change the output are a 400 naming them,
bookkeeping fields pass, every error is OpenAI's error object (never FastAPI's {"detail"}),
HEAD /health answers, and logit_bias / min_tokens reach the sampler and change what it draws."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _scripted_frontend import ScriptedFrontend
from _server_helpers import (  # noqa: F401
    CHAT,
    COMPLETION,
    client_fixture,
    frontend_fixture,
    tokenizer_fixture,
)
from fastapi.testclient import TestClient

from pdserve.engine.sampling import Sampler
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.sampling_types import SamplingRow
from pdserve.engine.stop import check_token_stop

REFUSED = [
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"n": 2}, "n"),
    ("completions", {"suffix": "tail"}, "suffix"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"use_beam_search": True}, "use_beam_search"),
    ("completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("completions", {"guided_json": {"type": "object"}}, "guided_json"),
    ("completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"function_call": "auto"}, "function_call"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ("chat", {"n": 4}, "n"),
    ("chat", {"audio": {"voice": "alloy"}}, "audio"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("chat", {"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ("chat", {"tempreature": 0.5}, "tempreature"),
]
ACCEPTED = [
    ("completions", {"user": "u1", "metadata": {"k": "v"}, "store": False, "n": 1, "best_of": 1}),
    ("completions", {"suffix": None, "response_format": {"type": "text"}, "service_tier": "auto"}),
    ("chat", {"tools": [], "tool_choice": "none", "parallel_tool_calls": False}),
    ("chat", {"response_format": {"type": "text"}, "modalities": ["text"], "user": "x"}),
    ("chat", {"messages": [{"role": "user", "content": "Hi", "name": "ann"}]}),
]


def _post(client: TestClient, endpoint: str, extra: dict[str, Any]) -> Any:
    base = COMPLETION if endpoint == "completions" else CHAT
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    return client.post(path, json={**base, **extra})


@pytest.mark.parametrize(("endpoint", "extra", "field"), REFUSED)
def test_unimplemented_fields_are_refused_by_name(
    client: TestClient, frontend: ScriptedFrontend, endpoint: str, extra: dict, field: str
) -> None:
    r = _post(client, endpoint, extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert frontend.calls == []


@pytest.mark.parametrize(("endpoint", "extra"), ACCEPTED)
def test_bookkeeping_fields_and_no_op_values_are_accepted(
    client: TestClient, endpoint: str, extra: dict
) -> None:
    assert _post(client, endpoint, extra).status_code == 200


def test_a_tool_call_message_is_refused_by_path(client: TestClient) -> None:
    messages = [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]
    r = client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].tool_calls"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nowhere", 404), ("DELETE", "/v1/completions", 405), ("PUT", "/health", 405)],
)
def test_routing_errors_are_openai_error_objects(
    client: TestClient, method: str, path: str, status: int
) -> None:
    r = client.request(method, path)
    assert r.status_code == status
    body = r.json()
    assert "detail" not in body and path in body["error"]["message"]


def test_head_health_is_200(client: TestClient) -> None:
    assert client.head("/health").status_code == 200


def test_logit_bias_and_min_tokens_reach_the_frontend(
    client: TestClient, frontend: ScriptedFrontend
) -> None:
    r = _post(client, "completions", {"logit_bias": {"7": 100, "9": -100.0}, "min_tokens": 2})
    assert r.status_code == 200, r.text
    p = frontend.calls[0].params
    assert p.logit_bias == ((7, 100.0), (9, -100.0)) and p.min_tokens == 2
    assert p.eos_token_ids == (frontend.tokenizer.eos_token_id,)


# -- the sampler --------------------------------------------------------------------------------


def _draw(params: SamplingParams, logits: list[float], out: tuple[int, ...] = ()) -> int:
    row = SamplingRow(params, [1, 2], out)
    return Sampler(seed=0)(torch.tensor([logits]), [row]).token_ids[0]


def test_logit_bias_moves_greedy_and_sampled_draws() -> None:
    logits = [0.0, 5.0, 1.0, 0.5]
    greedy = SamplingParams(temperature=0.0)
    assert _draw(greedy, logits) == 1
    assert _draw(SamplingParams(temperature=0.0, logit_bias={"2": 10}), logits) == 2
    banned = SamplingParams(temperature=1.0, seed=1, logit_bias={1: -100, 2: -100, 3: -100})
    assert all(_draw(banned, logits, tuple(range(i))) == 0 for i in range(20))


def test_min_tokens_holds_back_eos_and_stop_tokens_then_lets_them_stop() -> None:
    logits = [0.0, 9.0, 8.0, 1.0]  # greedy picks 1 (EOS), then 2 (a stop token)
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2]).with_eos((1,))
    assert _draw(p, logits) == 3 and _draw(p, logits, (3,)) == 3
    assert _draw(p, logits, (3, 3)) == 1  # two tokens out: EOS may come
    assert check_token_stop(1, 2, 5, p, (1,), 100) is None  # the 2nd token cannot stop
    assert check_token_stop(1, 3, 6, p, (1,), 100) == "stop"
    assert check_token_stop(2, 3, 6, p, (1,), 100) == "stop"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("inf")}, "top_p"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"logit_bias": {"5": float("nan")}}, "logit_bias"),
        ({"stop": ["x"] * 65}, "stop"),
        ({"stop": ["y" * 513]}, "stop"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"seed": 1 << 70}, "seed"),
    ],
)
def test_sampling_params_refuse_with_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_logit_bias_survives_the_wire() -> None:
    p = SamplingParams(logit_bias={3: 1.5}, min_tokens=1).with_eos((2,))
    d = p.to_dict()
    assert d["logit_bias"] == {"3": 1.5} and "eos_token_ids" not in d
    assert SamplingParams.from_dict(d) == SamplingParams(logit_bias={3: 1.5}, min_tokens=1)
    with pytest.raises(InvalidRequestError, match="logit_bias names token id 99"):
        SamplingParams(logit_bias={99: 1}).check_vocab(50)
