"""`pdserve up` records its Ray address per deployment; `status` and `down` use it, never
`--address auto`'s guess, and say what to pass when nothing is recorded."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pdserve.cluster.cli import main
from pdserve.cluster.launch import address_book


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_record_lookup_forget(cache: Path) -> None:
    assert address_book.lookup("web") is None
    address_book.record("web", "10.0.0.5:6379", "http://127.0.0.1:8000")
    address_book.record("batch", "10.0.0.9:6379", "http://127.0.0.1:8001")
    assert address_book.lookup("web") == "10.0.0.5:6379"
    assert address_book.lookup("batch") == "10.0.0.9:6379"  # one record per deployment
    path = cache / "deployments" / "web.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # its owner's only
    address_book.forget("web")
    address_book.forget("web")  # idempotent
    assert address_book.lookup("web") is None and address_book.lookup("batch") is not None


@pytest.mark.parametrize("content", ["not json", '{"address": 5}', "[1]", "x" * 5000])
def test_a_damaged_record_is_no_address(cache: Path, content: str) -> None:
    (cache / "deployments").mkdir()
    (cache / "deployments" / "web.json").write_text(content)
    assert address_book.lookup("web") is None


@pytest.mark.parametrize("verb", ["status", "down"])
def test_without_a_record_or_address_the_command_says_what_to_pass(
    verb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([verb, "-n", "web"]) == 1
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "no Ray address is recorded for deployment 'web'" in out and "--address" in out
