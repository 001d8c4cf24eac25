"""Which OpenAI (and vLLM) request fields pdserve takes, ignores, or refuses.

A field that would change the output and that pdserve does not implement is refused with a 400
naming it, so a client never believes it worked: ``tools`` silently ignored would return prose
where the caller expects a tool call. A field at its no-op value (``n: 1``, ``tools: []``,
``tool_choice: "none"``, ``response_format: {"type": "text"}``, ``null``) is accepted. Bookkeeping
fields that change nothing pdserve returns (``user``, ``metadata``, ``store``...) are accepted and
ignored. Any other field is refused as unrecognized, as OpenAI does, with the closest known name.
docs/operations.md lists them all.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pdserve.cluster.serving.openai_protocol import OpenAIError

# Accepted and ignored: they label or route a request, they never change its output.
BOOKKEEPING = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "parallel_tool_calls",  # only means something with tools, which are refused
        "request_id",  # vLLM's; the response's id is pdserve's own
    }
)


def _is_none(v: Any) -> bool:
    return v is None


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {} or v == ""


def _false(v: Any) -> bool:
    return v is None or v is False


def _one(v: Any) -> bool:
    return v is None or (v == 1 and not isinstance(v, bool))


def _text_format(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and v == {"type": "text"})


def _no_tool(v: Any) -> bool:
    return v is None or v == "none"


def _text_modality(v: Any) -> bool:
    return v is None or v == ["text"]


def _true(v: Any) -> bool:
    return v is None or v is True


# field -> (accepted when, why refused otherwise). Both endpoints.
_COMMON: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (_one, "one sample per request is generated: send best_of=1 or leave it out"),
    "response_format": (
        _text_format,
        'structured output (json_object, json_schema) is not implemented: send {"type": "text"} '
        "or leave it out",
    ),
    "use_beam_search": (_false, "beam search is not implemented: leave it out"),
    "length_penalty": (_one, "only applies to beam search, which is not implemented"),
    "prompt_logprobs": (_is_none, "prompt logprobs are not implemented: leave it out"),
    "allowed_token_ids": (_empty, "not implemented: use logit_bias to favour or ban tokens"),
    "bad_words": (_empty, "not implemented: use logit_bias with -100 to ban tokens"),
    "guided_json": (_is_none, "guided decoding is not implemented"),
    "guided_regex": (_is_none, "guided decoding is not implemented"),
    "guided_choice": (_is_none, "guided decoding is not implemented"),
    "guided_grammar": (_is_none, "guided decoding is not implemented"),
    "guided_decoding_backend": (_is_none, "guided decoding is not implemented"),
    "structured_outputs": (_is_none, "structured output is not implemented"),
    "structural_tag": (_is_none, "structured output is not implemented"),
    "logits_processors": (_empty, "custom logits processors are not accepted"),
    "truncate_prompt_tokens": (_is_none, "not implemented: send a prompt that fits the context"),
    "spaces_between_special_tokens": (_true, "not implemented: leave it out"),
    "return_tokens_as_token_ids": (_false, "not implemented: leave it out"),
    "priority": (lambda v: v is None or v == 0, "request priorities are not implemented"),
}

_COMPLETION: dict[str, tuple[Callable[[Any], bool], str]] = {
    "suffix": (_empty, "insertion (a suffix after the completion) is not implemented"),
    "add_special_tokens": (_true, "not implemented: the tokenizer's default special tokens apply"),
}

_CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_empty, "tool calling is not implemented: leave tools out"),
    "tool_choice": (_no_tool, 'tool calling is not implemented: send "none" or leave it out'),
    "functions": (_empty, "function calling is not implemented: leave functions out"),
    "function_call": (_no_tool, 'function calling is not implemented: send "none" or leave it out'),
    "audio": (_is_none, "audio output is not implemented"),
    "modalities": (_text_modality, 'only text output is implemented: send ["text"]'),
    "prediction": (_is_none, "predicted outputs are not implemented"),
    "reasoning_effort": (_is_none, "reasoning effort is not implemented for this model"),
    "verbosity": (_is_none, "verbosity is not implemented"),
    "web_search_options": (_is_none, "web search is not implemented"),
    "echo": (_false, "echo is not implemented for chat: send false or leave it out"),
    "add_generation_prompt": (_true, "the assistant's turn is always opened: leave it out"),
    "continue_final_message": (_false, "continuing the final message is not implemented"),
    "chat_template": (_is_none, "the model's own chat template is used: leave it out"),
    "chat_template_kwargs": (_empty, "the model's own chat template is used: leave it out"),
    "documents": (_empty, "documents (RAG templates) are not implemented"),
}

# Fields a nested chat message may carry besides role and content.
MESSAGE_BOOKKEEPING = frozenset({"name"})
_MESSAGE_REFUSED = {
    "tool_calls": "tool calling is not implemented",
    "tool_call_id": "tool calling is not implemented",
    "function_call": "function calling is not implemented",
    "audio": "audio is not implemented",
    "refusal": "refusals are not implemented",
}


def check_extra(extra: Mapping[str, Any] | None, endpoint: str, known: Iterable[str]) -> None:
    """400 (OpenAIError naming the field) for the first field in ``extra`` (what the request
    model did not declare) that is refused or unknown; ``endpoint`` is "completions" or "chat"."""
    policy = {**_COMMON, **(_CHAT if endpoint == "chat" else _COMPLETION)}
    for name, value in (extra or {}).items():
        if name in BOOKKEEPING:
            continue
        rule = policy.get(name)
        if rule is None:
            raise _unrecognized(name, [*known, *BOOKKEEPING, *policy])
        accepted, why = rule
        if not accepted(value):
            raise OpenAIError(400, f"{name} is not supported: {why}", param=name)


def check_message_extra(extra: Mapping[str, Any] | None, index: int) -> None:
    """The same for the extra fields of ``messages[index]``."""
    for name, value in (extra or {}).items():
        if name in MESSAGE_BOOKKEEPING or value is None or value == []:
            continue
        param = f"messages[{index}].{name}"
        why = _MESSAGE_REFUSED.get(name)
        if why is None:
            raise _unrecognized(param, ["role", "content", *MESSAGE_BOOKKEEPING])
        raise OpenAIError(400, f"{param} is not supported: {why}", param=param)


def _unrecognized(name: str, known: list[str]) -> OpenAIError:
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    shown = name if len(name) <= 80 else name[:77] + "..."
    return OpenAIError(
        400,
        f"unrecognized request argument supplied: {shown}{hint}",
        param=shown,
        code="unrecognized_argument",
    )
