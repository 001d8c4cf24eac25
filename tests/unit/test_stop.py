"""Stop conditions: token-level finish reasons and streamed stop strings."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.stop import StopStringMatcher, check_token_stop

EOS = 2


def reason(
    token_id: int, num_output: int = 1, seq_len: int = 10, max_model_len: int = 100, **params: Any
) -> str | None:
    params_ = SamplingParams(**params)
    return check_token_stop(token_id, num_output, seq_len, params_, {EOS}, max_model_len)


def test_eos_stops_unless_ignored() -> None:
    assert reason(EOS) == "stop"
    assert reason(EOS, ignore_eos=True) is None
    assert reason(7) is None


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    assert reason(7, stop_token_ids=[7], ignore_eos=True) == "stop"


@pytest.mark.parametrize(
    ("num_output", "seq_len", "max_model_len", "want"),
    [(4, 10, 100, "length"), (3, 10, 100, None), (1, 100, 100, "length"), (1, 99, 100, None)],
)
def test_length_from_max_tokens_or_model_context(
    num_output: int, seq_len: int, max_model_len: int, want: str | None
) -> None:
    assert reason(7, num_output, seq_len, max_model_len, max_tokens=4) == want


def test_stop_token_beats_length() -> None:
    assert reason(EOS, num_output=4, seq_len=100, max_model_len=100, max_tokens=4) == "stop"


def stream(matcher: StopStringMatcher, deltas: Sequence[str]) -> tuple[list[str], bool]:
    """Feed deltas until a stop; the emitted pieces and whether a stop string matched."""
    out = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
        if stopped:
            return out, True
    return out, False


def test_stop_string_split_across_many_deltas_is_never_shown() -> None:
    pieces, stopped = stream(
        StopStringMatcher(["###END"]), ["Hello #", "#", "#E", "N", "D and more"]
    )
    assert stopped
    assert pieces == ["Hello ", "", "", "", ""]


def test_false_start_is_released_when_it_stops_matching() -> None:
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("d") == ("abd", False)
    assert matcher.flush() == ""


def test_several_stop_strings_first_one_to_complete_wins() -> None:
    pieces, stopped = stream(StopStringMatcher(["\n\n", "STOP"]), ["one STO", "P two\n\n"])
    assert (pieces, stopped) == (["one ", ""], True)
    assert StopStringMatcher(["STOP", "\n\n"]).feed("a\n\nb STOP") == ("a", True)


def test_stop_string_at_the_very_start() -> None:
    assert StopStringMatcher(["STOP"]).feed("STOP and the rest") == ("", True)


def test_include_stop_str_in_output() -> None:
    pieces, stopped = stream(StopStringMatcher(["###END"], True), ["Hello ##", "#END tail"])
    assert (pieces, stopped) == (["Hello ", "###END"], True)


def test_no_stop_strings_pass_everything_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.feed("") == ("", False)
    assert matcher.flush() == ""


def test_flush_releases_a_held_tail_on_another_finish() -> None:
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("abc #") == ("abc ", False)
    assert matcher.flush() == "#"


def test_random_splits_emit_exactly_the_text_before_the_stop_string() -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        stop = "".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        matcher = StopStringMatcher([stop])
        pieces, stopped = stream(matcher, deltas)
        emitted = "".join(pieces) + ("" if stopped else matcher.flush())
        at = text.find(stop)
        assert stopped == (at >= 0)
        # nothing of a stop string that completes is ever emitted, and nothing else is lost
        assert emitted == (text[:at] if at >= 0 else text), (text, stop, deltas)
