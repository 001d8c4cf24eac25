"""Per-request sampling parameters: the contract between the front end and both workers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class InvalidRequestError(ValueError):
    """A request the caller must fix; the message says what to change."""


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into tokens and when to stop (names follow vLLM's SamplingParams).

    temperature 0 means greedy. top_k <= 0 and top_p == 1 and min_p == 0 disable those filters.
    A seed makes a request's samples reproducible whatever else shares its batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Normalise list inputs (JSON, msgpack) to tuples so the object stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, value: Any, want: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name}={value!r} is invalid: {want}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "ask for at least 1 token")
        if self.temperature < 0:
            raise bad("temperature", self.temperature, "use 0 for greedy or a positive value")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "must be in (0, 1]; use 1 to disable")
        if self.top_k < -1:
            raise bad("top_k", self.top_k, "use 0 or -1 to disable, or a positive count")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "must be in [0, 1]; use 0 to disable")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be > 0; 1 disables it")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise bad(name, value, "must be in [-2, 2]; 0 disables it")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", self.logprobs, "ask for 0 to 20 top logprobs")
        if any(not s for s in self.stop):
            raise bad("stop", self.stop, "stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "token ids are non-negative")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for msgpack and JSON."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s) {unknown}; known ones are {sorted(names)}"
            )
        return cls(**d)
