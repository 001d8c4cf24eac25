"""When a sequence stops: per-token checks (eos, stop tokens, length) and stop strings in text."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from pdserve.engine.sampling_params import SamplingParams


def check_token_stop(
    token_id: int,
    num_output_tokens: int,
    seq_len: int,
    params: SamplingParams,
    eos_token_ids: Collection[int],
    max_model_len: int,
) -> str | None:
    """Finish reason after appending token_id, or None to go on.

    num_output_tokens and seq_len (prompt + output) both count token_id. "stop" for an eos token
    (unless params.ignore_eos) or one of params.stop_token_ids; "length" when max_tokens are out
    or the sequence filled the model's context. A stop token wins when both hold. Before
    params.min_tokens outputs no token stops it (the sampler holds those tokens back).
    """
    stoppable = num_output_tokens > params.min_tokens
    eos = not params.ignore_eos and token_id in eos_token_ids
    if stoppable and (token_id in params.stop_token_ids or eos):
        return "stop"
    if num_output_tokens >= params.max_tokens or seq_len >= max_model_len:
        return "length"
    return None


class StopStringMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    feed() holds back the longest tail of the text that could still grow into a stop string, so
    a client never sees the start of a stop string that later completes. A match can only start
    inside that held tail, so each feed scans the tail plus the new delta, not the whole text.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        assert all(stop), "stop strings must be non-empty (SamplingParams checks this)"
        self._stop = tuple(stop)
        self._include = include_stop_str_in_output
        self._held = ""  # text received but not yet emitted
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string completed (nothing follows it)."""
        if self._stopped:
            return "", True
        text = self._held + delta
        match = self._earliest_match(text)
        if match is not None:
            start, stop = match
            self._held = ""
            self._stopped = True
            return text[: start + len(stop)] if self._include else text[:start], True
        keep = self._partial_tail_len(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release the held-back tail when the sequence finishes for another reason."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        # The stop string that starts first; on a tie the longest, which covers the others.
        best: tuple[int, str] | None = None
        for stop in self._stop:
            start = text.find(stop)
            if start < 0:
                continue
            if best is None or (start, -len(stop)) < (best[0], -len(best[1])):
                best = (start, stop)
        return best

    def _partial_tail_len(self, text: str) -> int:
        # Length of the longest suffix of text that is a proper prefix of some stop string.
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
