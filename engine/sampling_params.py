"""Per-request sampling parameters: the contract between the front end and both workers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 64  # stop strings per request: matching runs on the frontend's event loop
MAX_STOP_CHARS = 512  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (OpenAI documents no bound; vLLM's is the vocab)
MAX_SEED = (1 << 64) - 1


class InvalidRequestError(ValueError):
    """A request the caller must fix; the message says what to change, ``param`` (when known)
    the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into tokens and when to stop (names follow vLLM's SamplingParams).

    temperature 0 means greedy. top_k <= 0 and top_p == 1 and min_p == 0 disable those filters.
    A seed makes a request's samples reproducible whatever else shares its batch.
    ``logit_bias`` (OpenAI's: token id -> a bias in [-100, 100] added to its logit before any other
    processing, greedy included) is kept as sorted ``(token_id, bias)`` pairs so the object stays
    hashable. ``min_tokens`` (vLLM's) holds back the EOS and ``stop_token_ids`` until that many
    tokens are out: the sampler masks them and the stop check ignores them. ``eos_token_ids`` is
    the model's EOS set for that mask, filled by the serving layer (``with_eos``), as vLLM's
    ``all_stop_token_ids``; it is not a client field.
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
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple, repr=False)

    def __post_init__(self) -> None:
        # Normalise list inputs (JSON, msgpack) to tuples so the object stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        _check_types(self)
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, value: Any, want: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name}={value!r} is invalid: {want}")

        for name in _FLOATS:  # NaN passes every comparison below, and inf breaks sampling
            if not math.isfinite(getattr(self, name)):
                raise bad(name, getattr(self, name), "must be a finite number")
        if self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "ask for at least 1 token")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad(
                "min_tokens", self.min_tokens, f"must be in [0, max_tokens={self.max_tokens}]"
            )
        if self.seed is not None and not -MAX_SEED <= self.seed <= MAX_SEED:
            raise bad("seed", self.seed, "must be in [-(2**64 - 1), 2**64 - 1]")
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
        self._validate_lists()

    def _validate_lists(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"stop holds {len(self.stop)} strings: send at most {MAX_STOP_STRINGS}", "stop"
            )
        for s in self.stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise InvalidRequestError(
                    f"stop={_short(s)} is invalid: stop strings must hold 1 to {MAX_STOP_CHARS} "
                    "characters",
                    "stop",
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids is invalid: send at most {MAX_STOP_TOKEN_IDS} token ids, each >= 0",
                "stop_token_ids",
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"logit_bias holds {len(self.logit_bias)} entries: send at most {MAX_LOGIT_BIAS}",
                "logit_bias",
            )
        for token, value in self.logit_bias:
            if token < 0 or not -100.0 <= value <= 100.0:
                raise InvalidRequestError(
                    f"logit_bias={{{token}: {value}}} is invalid: keys are token ids >= 0 and "
                    "values biases in [-100, 100]",
                    "logit_bias",
                )

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names (logit_bias, stop_token_ids) exist in a vocabulary of
        ``vocab_size`` tokens; InvalidRequestError names the first that does not."""
        for name, ids in (
            ("logit_bias", [t for t, _ in self.logit_bias]),
            ("stop_token_ids", self.stop_token_ids),
        ):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"{name} names token id {bad[0]}, outside the model's vocabulary of "
                    f"{vocab_size} tokens: send ids below {vocab_size}",
                    name,
                )

    def with_eos(self, eos_token_ids: tuple[int, ...]) -> SamplingParams:
        """These parameters with the model's EOS ids (what min_tokens holds back)."""
        if not self.min_tokens or eos_token_ids == self.eos_token_ids:
            return self
        return dataclasses.replace(self, eos_token_ids=tuple(eos_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for msgpack and JSON."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["logit_bias"] = {str(t): b for t, b in self.logit_bias}  # JSON and msgpack: str keys
        del d["eos_token_ids"]  # the server's to fill, not the client's
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        names = {f.name for f in dataclasses.fields(cls)} - {"eos_token_ids"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s) {unknown}; known ones are {sorted(names)}"
            )
        return cls(**d)


_FLOATS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
_INTS = ("max_tokens", "top_k", "min_tokens")
_BOOLS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


def _check_types(p: SamplingParams) -> None:
    """Types first, so a wrong one is a clear InvalidRequestError and never a TypeError."""

    def wrong(name: str, want: str) -> InvalidRequestError:
        value = getattr(p, name)
        return InvalidRequestError(f"{name}={_short(value)} is invalid: must be {want}")

    for name in _FLOATS:
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong(name, "a number")
    for name in _INTS:
        if not _is_int(getattr(p, name)):
            raise wrong(name, "an integer")
    if p.seed is not None and not _is_int(p.seed):
        raise wrong("seed", "an integer or null")
    if p.logprobs is not None and not _is_int(p.logprobs):
        raise wrong("logprobs", "an integer or null")
    for name in _BOOLS:
        if not isinstance(getattr(p, name), bool):
            raise wrong(name, "true or false")
    if not isinstance(p.stop, list | tuple) or not all(isinstance(s, str) for s in p.stop):
        raise wrong("stop", "a string or a list of strings")
    if not isinstance(p.stop_token_ids, list | tuple) or not all(
        _is_int(t) for t in p.stop_token_ids
    ):
        raise wrong("stop_token_ids", "a list of token ids")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bias_pairs(bias: object) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs, from a map (JSON's keys are strings) or
    pairs; InvalidRequestError for anything else."""
    items = bias.items() if isinstance(bias, Mapping) else bias
    try:
        pairs = {}
        for key, value in items:  # type: ignore[attr-defined]
            token = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            if not _is_int(token) or isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError
            pairs[token] = float(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(
            f"logit_bias={_short(bias)} is invalid: send a map of token id (an integer, or its "
            'digits as a string) to a bias in [-100, 100], e.g. {"50256": -100}',
            "logit_bias",
        ) from None
    for token, value in pairs.items():
        if not math.isfinite(value):
            raise InvalidRequestError(
                f"logit_bias[{token}]={value} is invalid: must be finite", "logit_bias"
            )
    return tuple(sorted(pairs.items()))


def _short(value: object, limit: int = 60) -> str:
    """repr(value), cut to ``limit`` characters: a message never echoes a huge input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
