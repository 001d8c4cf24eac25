"""Tokenizer loading and prompt encoding: round trips and the errors a user would see."""

from __future__ import annotations

from pathlib import Path

import pytest
from _tok import make_tokenizer

from pdserve.engine.sampling_params import InvalidRequestError
from pdserve.engine.tokenizer import (
    TokenizerLoadError,
    apply_chat_template,
    encode_prompt,
    load_tokenizer,
)

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def test_load_tokenizer_from_a_saved_directory(tmp_path: Path) -> None:
    original = make_tokenizer()
    original.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    text = "naïve café 日本語 🙂"
    assert loaded.encode(text) == original.encode(text)
    assert loaded.eos_token == "<|eos|>"


def test_load_tokenizer_errors_name_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="not a directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerLoadError, match=r"no tokenizer files .*tokenizer\.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="could not load"):
        load_tokenizer(str(tmp_path))


def test_encode_prompt_text_and_token_ids() -> None:
    tok = make_tokenizer()
    assert encode_prompt(tok, "the lazy dog") == tok.encode("the lazy dog")
    assert encode_prompt(tok, [5, 0, len(tok) - 1]) == [5, 0, len(tok) - 1]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([1, 320], r"token 1 is 320, outside the vocabulary \[0, 320\)"),
        ([-1], "outside the vocabulary"),
        ([1, 2.0], "list of integers"),
        ([True], "list of integers"),
        ([], "empty"),
        ("", "empty"),
    ],
)
def test_encode_prompt_rejects_bad_prompts(prompt: object, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        encode_prompt(make_tokenizer(), prompt)  # type: ignore[arg-type]


def test_chat_template_renders_with_generation_prompt() -> None:
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "café?"}]
    ids = apply_chat_template(tok, messages)
    assert tok.decode(ids) == "[system] be brief\n[user] café?\n[assistant] "


def test_chat_without_template_says_what_to_do_instead() -> None:
    with pytest.raises(InvalidRequestError, match=r"no chat template.*/v1/completions"):
        apply_chat_template(make_tokenizer(), [{"role": "user", "content": "hi"}])


def test_chat_rejects_malformed_messages() -> None:
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    with pytest.raises(InvalidRequestError, match="messages is empty"):
        apply_chat_template(tok, [])
    with pytest.raises(InvalidRequestError, match=r"messages\[0\]\.content"):
        apply_chat_template(tok, [{"role": "user"}])


def test_the_frontend_refuses_an_empty_text_only_when_it_has_no_tokens() -> None:
    """``LLM.generate("")`` behaves as /v1/completions: "" is BOS alone where the tokenizer adds
    one, and refused (no tokens) where it does not."""
    from tokenizers.processors import TemplateProcessing

    from pdserve.router.frontend import Frontend

    plain = make_tokenizer()
    with pytest.raises(InvalidRequestError, match="at least one token"):
        Frontend(None, plain, max_model_len=64).tokenize("")  # type: ignore[arg-type]
    with_bos = make_tokenizer()
    bos = with_bos.convert_tokens_to_ids("<|eos|>")
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|eos|> $A", special_tokens=[("<|eos|>", bos)]
    )
    frontend = Frontend(None, with_bos, max_model_len=64)  # type: ignore[arg-type]
    assert frontend.tokenize("") == [bos] == encode_prompt(with_bos, "")
    assert frontend.tokenize("the dog") == [bos, *plain.encode("the dog")]
