"""Shaping frontend output into OpenAI replies and stream chunks, completions and chat alike."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from pdserve.cluster.serving.openai_responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
    UsageInfo,
)
from pdserve.engine.sampling_types import TokenLogprobs

Logprobs = Sequence[TokenLogprobs | None]


def sse(event: BaseModel) -> str:
    """One server-sent event."""
    return f"data: {event.model_dump_json()}\n\n"


class ReplyFormat(ABC):
    """How one request's output is shaped: a whole reply, or stream chunks in order."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: str, request_id: str) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.request_id = request_id
        self.created = int(time.time())

    def opening(self) -> list[BaseModel]:
        """Chunks sent before the first token."""
        return []

    @abstractmethod
    def chunk(self, text: str, logprobs: Logprobs, finish_reason: str | None) -> BaseModel:
        """One streamed delta."""

    @abstractmethod
    def usage_chunk(self, usage: UsageInfo) -> BaseModel:
        """The last chunk when stream_options.include_usage: no choices, only usage."""

    @abstractmethod
    def reply(
        self, text: str, logprobs: Logprobs, finish_reason: str | None, usage: UsageInfo
    ) -> BaseModel:
        """The whole reply of a request that did not stream."""

    def token_text(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id])
        assert isinstance(text, str)
        return text


class CompletionFormat(ReplyFormat):
    """/v1/completions: object "text_completion", choices[].text, logprobs as in the legacy API."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: str, request_id: str) -> None:
        super().__init__(tokenizer, model, request_id)
        self._offset = 0  # characters streamed so far: text_offset continues across chunks

    def chunk(self, text: str, logprobs: Logprobs, finish_reason: str | None) -> BaseModel:
        choice = CompletionChoice(
            text=text, logprobs=self._logprobs(logprobs, self._offset), finish_reason=finish_reason
        )
        self._offset += len(text)
        return self._response([choice], None)

    def usage_chunk(self, usage: UsageInfo) -> BaseModel:
        return self._response([], usage)

    def reply(
        self, text: str, logprobs: Logprobs, finish_reason: str | None, usage: UsageInfo
    ) -> BaseModel:
        choice = CompletionChoice(
            text=text, logprobs=self._logprobs(logprobs, 0), finish_reason=finish_reason
        )
        return self._response([choice], usage)

    def _response(self, choices: list[CompletionChoice], usage: UsageInfo | None) -> BaseModel:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _logprobs(self, logprobs: Logprobs, offset: int) -> CompletionLogprobs | None:
        entries = [lp for lp in logprobs if lp is not None]
        if not entries:
            return None
        tokens = [self.token_text(lp.token_id) for lp in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in entries],
            top_logprobs=[{self.token_text(t): v for t, v in lp.top} for lp in entries],
            text_offset=offsets,
        )


class ChatFormat(ReplyFormat):
    """/v1/chat/completions: a message reply, or chunks of deltas opened by the role."""

    def opening(self) -> list[BaseModel]:
        return [self._chunk([ChatStreamChoice(delta=ChatDelta(role="assistant", content=""))])]

    def chunk(self, text: str, logprobs: Logprobs, finish_reason: str | None) -> BaseModel:
        delta = ChatDelta(content=text) if text else ChatDelta()
        choice = ChatStreamChoice(
            delta=delta, logprobs=self._logprobs(logprobs), finish_reason=finish_reason
        )
        return self._chunk([choice])

    def usage_chunk(self, usage: UsageInfo) -> BaseModel:
        return self._chunk([], usage)

    def reply(
        self, text: str, logprobs: Logprobs, finish_reason: str | None, usage: UsageInfo
    ) -> BaseModel:
        choice = ChatChoice(
            message=ChatMessageOut(content=text),
            logprobs=self._logprobs(logprobs),
            finish_reason=finish_reason,
        )
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage,
        )

    def _chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> BaseModel:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _logprobs(self, logprobs: Logprobs) -> ChatLogprobs | None:
        entries = [lp for lp in logprobs if lp is not None]
        if not entries:
            return None
        content = [
            ChatTokenLogprob(
                **self._top(lp.token_id, lp.logprob).model_dump(),
                top_logprobs=[self._top(t, v) for t, v in lp.top],
            )
            for lp in entries
        ]
        return ChatLogprobs(content=content)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        token = self.token_text(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))
