"""Bench checkpoints get a tokenizer that covers their whole vocabulary, so a server streams
every generated id as text."""

from __future__ import annotations

from pdserve.bench.models import id_tokenizer


def test_id_tokenizer_decodes_every_id_to_text() -> None:
    tok = id_tokenizer(100)
    assert len(tok) == 100
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert all(tok.decode([i]) == f"t{i}" for i in range(3, 100))
    assert tok.decode([5, 99, 2], skip_special_tokens=True) == "t5 t99"
    assert tok.encode("t7 t42", add_special_tokens=False) == [7, 42]
