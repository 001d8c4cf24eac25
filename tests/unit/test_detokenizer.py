"""Incremental detokenizer: streamed deltas are valid text and add up to tokenizer.decode."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from _tok import WORDS, byte_token_ids, make_tokenizer
from transformers import PreTrainedTokenizerFast

from pdserve.engine.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], rng: random.Random | None = None
) -> list[str]:
    """Add ids one at a time, or in random chunks of 1..4 when rng is given."""
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4) if rng else 1
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    return deltas


def test_streamed_text_equals_the_encoded_text(tok: PreTrainedTokenizerFast) -> None:
    text = "naïve café says 日本語 🙂 over the lazy dog 👍🏽"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("hello world"))
    deltas = stream(detok, ids)
    assert "".join(deltas) == detok.text == text
    assert not any(REPLACEMENT in d for d in deltas)
    assert detok.token_ids == ids


def test_a_split_character_appears_whole_once_its_last_byte_arrives(
    tok: PreTrainedTokenizerFast,
) -> None:
    ids = byte_token_ids(tok, "a🙂日")  # 1 + 4 + 3 tokens
    deltas = stream(IncrementalDetokenizer(tok, []), ids)
    assert deltas == ["a", "", "", "", "🙂", "", "", "日"]


def test_complete_text_before_a_split_character_is_not_held(tok: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tok, [])
    emoji = byte_token_ids(tok, "🙂")
    assert detok.add(tok.encode("dog") + emoji[:2]) == "dog"
    assert detok.add(emoji[2:] + tok.encode(" ok")) == "🙂 ok"


def random_output(tok: PreTrainedTokenizerFast, rng: random.Random) -> list[int]:
    # Words encoded normally or byte by byte, so multi-byte characters split at random places;
    # now and then an eos between words.
    ids: list[int] = []
    for _ in range(rng.randint(1, 12)):
        word = rng.choice(WORDS) + rng.choice(["", " "])
        ids += byte_token_ids(tok, word) if rng.random() < 0.4 else tok.encode(word)
        if rng.random() < 0.05:
            ids.append(tok.eos_token_id)
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_outputs_match_decode(
    tok: PreTrainedTokenizerFast, skip_special_tokens: bool
) -> None:
    rng = random.Random(skip_special_tokens)
    for _ in range(150):
        ids = random_output(tok, rng)
        prompt = random_output(tok, rng)
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens)
        deltas = stream(detok, ids, rng)
        assert detok.text == tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == detok.text
        assert not any(REPLACEMENT in d for d in deltas)


def test_arbitrary_ids_match_decode_after_flush(tok: PreTrainedTokenizerFast) -> None:
    # Random ids include lone continuation bytes and outputs that end mid-character.
    rng = random.Random(1)
    for _ in range(150):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 20))]
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 8))]
        skip = rng.random() < 0.5
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        deltas = [*stream(detok, ids, rng), detok.flush()]
        assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens_shown_only_when_not_skipped(tok: PreTrainedTokenizerFast) -> None:
    ids = [*tok.encode("the end"), tok.eos_token_id]
    for skip, want in [(True, "the end"), (False, "the end<|eos|>")]:
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        stream(detok, ids)
        assert detok.text == want


def test_ids_beyond_the_tokenizer_vocab_add_no_text(tok: PreTrainedTokenizerFast) -> None:
    # The model's embedding table is often padded past the tokenizer's vocabulary.
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add([len(tok) + 3]) == ""
    assert detok.add(tok.encode("fox")) == "fox"


def test_each_call_decodes_a_short_window_only(
    tok: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    widths: list[int] = []
    decode = tok.decode

    def counting_decode(ids: list[int], **kwargs: bool) -> str:
        widths.append(len(ids))
        text = decode(ids, **kwargs)
        assert isinstance(text, str)
        return text

    monkeypatch.setattr(tok, "decode", counting_decode)
    rng = random.Random(2)
    ids = [t for _ in range(100) for t in random_output(tok, rng)]
    assert len(ids) > 2000
    stream(IncrementalDetokenizer(tok, tok.encode("the quick brown fox")), ids)
    assert max(widths) <= 8  # a 4-byte character split over 4 tokens, plus context
