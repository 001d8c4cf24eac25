"""Text prompts of the benchmark: the shipped public-domain prose, cut to planned lengths in the
served model's tokens (a tiny model's real tokenizer here), or estimated without one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pdserve.bench.serve.prompts import INSTRUCTIONS, PASSAGE_FILE, TextPrompts, load_passage
from pdserve.bench.serve.tokens import (
    TOKENS_PER_WORD,
    TextTokens,
    TokenizerNotFound,
    _candidates,
    find_tokens,
)
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.engine.tokenizer import apply_chat_template, encode_prompt

LENGTHS = [1, 12, 40, 300, 2500]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tok") / "llama", "llama")


def test_the_passage_file_is_a_few_thousand_words_of_named_public_domain_prose() -> None:
    header = [line for line in PASSAGE_FILE.read_text("utf-8").splitlines() if line[:1] == "#"]
    for work in ("Alice's Adventures in Wonderland", "Pride and Prejudice", "Gettysburg"):
        assert work in header[0]
    assert "transcription differences" in " ".join(header)
    prose = load_passage()
    assert prose.startswith("Alice's Adventures in Wonderland") and "#" not in prose[:200]
    assert 4000 < len(prose.split()) < 6000
    assert "It is a truth universally acknowledged" in prose
    assert prose.endswith("shall not perish from the earth.")


@pytest.mark.parametrize("chat", [False, True])
def test_text_prompts_arrive_at_the_planned_length(tiny_dir: Path, chat: bool) -> None:
    tokens = find_tokens(str(tiny_dir), "served-name", chat)
    assert tokens.name == str(tiny_dir) and tokens.overhead >= 1  # BOS, or the template
    prompts = TextPrompts(tokens).make(LENGTHS, seed=3)
    tok = tokens.tokenizer
    for length, prompt in zip(LENGTHS, prompts):
        messages = [{"role": "user", "content": prompt.text}]
        served = len(
            apply_chat_template(tok, messages) if chat else encode_prompt(tok, prompt.text)
        )
        assert served == prompt.tokens  # what the server will count, exactly
        if length > tokens.overhead + 8:
            assert length - 3 <= prompt.tokens <= length
    long_one = prompts[-1].text
    assert long_one.startswith(INSTRUCTIONS) and "Alice" in long_one  # real words, wrapped
    assert TextPrompts(tokens).make(LENGTHS, seed=3) == prompts
    assert TextPrompts(tokens).make(LENGTHS, seed=4) != prompts


def test_without_a_tokenizer_lengths_are_estimated_from_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        tokens = find_tokens(None, "no-such-model", chat=True)
    assert tokens == TextTokens() and "pass --tokenizer" in caplog.text
    (prompt,) = TextPrompts(tokens).make([400], seed=0)
    assert prompt.tokens <= 400
    assert len(prompt.text.split()) == pytest.approx(400 / TOKENS_PER_WORD, abs=2)


def test_a_tokenizer_flag_that_does_not_load_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(TokenizerNotFound, match="a local model directory, a GGUF file"):
        find_tokens(str(tmp_path / "missing"), "m", chat=False)


def test_the_served_model_id_is_tried_as_a_path_then_as_a_builtin(tiny_dir: Path) -> None:
    assert _candidates("smollm2-135m-instruct") == ["builtin:smollm2-135m-instruct"]
    assert _candidates(str(tiny_dir)) == [str(tiny_dir)]
    assert _candidates("my-served-name") == []
