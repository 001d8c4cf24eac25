"""Speculative decoding's rules, without a model: the n-gram proposer (prompt lookup), the
acceptance rule and its counters, the per-sequence acceptance gate, and the settings' checks.
Verification in the decode engine is test_speculative.py's."""

from __future__ import annotations

import pytest

from pdserve.engine.speculative import (
    AcceptanceGate,
    SpecCounters,
    SpeculativeSettings,
    accept,
    ngram_propose,
)


def test_ngram_finds_the_latest_earlier_match_of_the_longest_suffix() -> None:
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    # "1 2 3" occurred at 0 and 5; the latest earlier one is followed by 7 8 5 1
    assert ngram_propose(tokens, 4, n_max=3, n_min=1) == [7, 8, 5, 1]
    assert ngram_propose(tokens, 2, n_max=3, n_min=1) == [7, 8]
    # only n = 1 matches: the last token 4 never occurred before -> nothing
    assert ngram_propose([5, 6, 4], 3, n_max=3, n_min=1) == []
    # the suffix itself is no match: a run of one token proposes from its earlier part
    assert ngram_propose([7, 7, 7], 3, n_max=2, n_min=1) == [7]
    assert ngram_propose([1, 2], 3, n_max=2, n_min=2) == []


def test_ngram_ignores_matches_that_straddle_token_boundaries() -> None:
    # little-endian words: 256 = 00 01 00 00, 1 = 01 00 00 00; the byte string of [1] occurs
    # inside [256, 0] at an odd offset, which is no token match
    tokens = [256, 0, 5, 1]
    assert ngram_propose(tokens, 2, n_max=1, n_min=1) == []
    assert ngram_propose([1, 5, 256, 0, 1], 2, n_max=1, n_min=1) == [5, 256]


def test_accept_keeps_the_agreeing_prefix_and_the_next_draw() -> None:
    assert accept([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all accepted + bonus
    assert accept([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # second rejected: the draw replaces it
    assert accept([4, 5, 6], [1, 5, 6, 7]) == [1]
    c = SpecCounters()
    c.add(3, 4)
    c.add(3, 1)
    assert (c.proposed, c.accepted, c.emitted, c.verified) == (6, 3, 5, 2)
    assert c.acceptance_rate == 0.5 and c.mean_accepted_length == 2.5


def test_the_gate_switches_a_sequence_off_and_probes_it_again() -> None:
    gate = AcceptanceGate(min_rate=0.5, probe=3)
    assert gate.allows(1)
    gate.record(1, 4, 0)  # rate 0: switched off
    assert [gate.allows(1) for _ in range(6)] == [False, False, True, False, False, True]
    gate.record(1, 4, 4)
    gate.record(1, 4, 4)
    assert gate.allows(1)  # recovered above the bar


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="method"):
        SpeculativeSettings(method="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeSettings(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeSettings(method="draft")
