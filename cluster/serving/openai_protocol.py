"""OpenAI wire format: request models (validated at the HTTP edge) and the error type; the
response models are ``openai_responses``.

Requests are strict about types (``"temperature": "hot"`` is a 400 naming the field). Fields
the models do not declare are kept (``model_extra``) and judged by ``openai_fields.check_extra``:
bookkeeping ones are ignored, ones that would change the output unimplemented (``tools``,
``response_format``...) and unknown ones are a 400 naming them. Values are checked once more by
SamplingParams, whose messages name the field and the fix. Extras beyond OpenAI follow vLLM
(top_k, min_p, min_tokens, stop_token_ids...).

Limits, each answered with a 400 that says so: one choice per request (``n`` = 1), one prompt per
request (a list of one prompt is accepted), no ``echo``, text-only chat content.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict

from pdserve.cluster.serving.openai_responses import ErrorInfo, ErrorResponse
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "not_found_error",
    "requests",
    "server_error",
    "service_unavailable",
]


class OpenAIError(Exception):
    """An error the server answers with an OpenAI error object and ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: ErrorType = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(
            error=ErrorInfo(message=message, type=type, param=param, code=code)
        )
        self.headers = headers


# -- requests -----------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Checked(_Request):
    """A model whose undeclared fields are kept, for ``openai_fields`` to judge."""

    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Checked):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """SamplingParams for this request; InvalidRequestError names a bad field."""
        if self.n not in (1, None):
            raise InvalidRequestError(
                f"n={self.n} is invalid: this server returns one choice per request; send n=1 "
                "and make several requests for several choices"
            )
        given = {name: getattr(self, name) for name in _SAMPLING_FIELDS}
        kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)


_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "min_tokens",
    "logit_bias",
)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None  # None: ServerSettings.max_tokens_default (deploy_config)
    logprobs: int | None = None
    echo: bool = False

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (a list holding one prompt is unwrapped)."""
        p = self.prompt
        if isinstance(p, str) or all(isinstance(t, int) for t in p):
            return cast("str | list[int]", p)
        if len(p) != 1:
            raise InvalidRequestError(
                f"prompt holds {len(p)} prompts: send one prompt per request (as a string or a "
                "list of token ids) and make several requests, concurrently if you like",
                "prompt",
            )
        return cast("str | list[int]", p[0])


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Checked):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        """The message's text; text parts are joined, other parts are refused."""
        if self.content is None:
            raise InvalidRequestError(
                f"messages[{index}].content is missing: send its text", "messages"
            )
        if isinstance(self.content, str):
            return self.content
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    f"messages[{index}].content[{j}] has type {part.type!r}: only text parts "
                    '({"type": "text", "text": ...}) are supported',
                    "messages",
                )
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # wins over max_tokens; None: up to the context
    logprobs: bool = False
    top_logprobs: int | None = None

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    def logprobs_count(self) -> int | None:
        """SamplingParams.logprobs: None unless logprobs=true; then top_logprobs (default 0)."""
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequestError(
                    "top_logprobs needs logprobs=true: send both", "top_logprobs"
                )
            return None
        return self.top_logprobs or 0

    def max_new_tokens(self, prompt_len: int, max_model_len: int) -> int:
        limit = self.max_completion_tokens or self.max_tokens
        # At least 1, so a too-long prompt gets the frontend's "shorten the prompt" error.
        return limit if limit is not None else max(1, max_model_len - prompt_len)
