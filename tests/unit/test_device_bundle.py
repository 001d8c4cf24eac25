"""The device bundle's parts: every part within its size, every file rebuilt byte for byte
from them, and a missing part or a corrupt chunk named (no network: the files are made here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pdserve.bench.device_bundle import assemble, pack

SIZES = {"big.whl": 1000, "small.whl": 90, "mid.whl": 333}


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    out = []
    for name, size in SIZES.items():
        (tmp_path / name).write_bytes(os.urandom(size))
        out.append(tmp_path / name)
    return out


def test_parts_stay_within_their_size_and_rebuild_every_file(
    files: list[Path], tmp_path: Path
) -> None:
    parts = pack(files, tmp_path / "bundle", part_bytes=400, chunk_bytes=128)
    assert len(parts) >= sum(SIZES.values()) // 400 + 1
    for part in parts:
        chunks = [f for f in part.iterdir() if f.name != "manifest.json"]
        assert sum(f.stat().st_size for f in chunks) <= 400
    rebuilt = assemble(tmp_path / "bundle", tmp_path / "out")
    assert [p.name for p in rebuilt] == [f.name for f in files]
    assert all(r.read_bytes() == f.read_bytes() for r, f in zip(rebuilt, files))


def test_a_part_that_did_not_arrive_is_named(files: list[Path], tmp_path: Path) -> None:
    parts = pack(files, tmp_path / "bundle", part_bytes=400, chunk_bytes=128)
    for chunk in parts[0].iterdir():
        chunk.unlink()
    with pytest.raises(SystemExit, match=r"big\.whl: chunks big\.whl\.000.* carry every part"):
        assemble(tmp_path / "bundle", tmp_path / "out")


def test_a_corrupt_chunk_is_caught(files: list[Path], tmp_path: Path) -> None:
    parts = pack(files, tmp_path / "bundle", part_bytes=400, chunk_bytes=128)
    chunk = next(f for f in parts[1].iterdir() if f.name != "manifest.json")
    chunk.write_bytes(bytes(len(chunk.read_bytes())))
    with pytest.raises(SystemExit, match="sha256 differs"):
        assemble(tmp_path / "bundle", tmp_path / "out")


def test_without_the_last_part_there_is_no_manifest(files: list[Path], tmp_path: Path) -> None:
    parts = pack(files, tmp_path / "bundle", part_bytes=400, chunk_bytes=128)
    (parts[-1] / "manifest.json").unlink()
    with pytest.raises(SystemExit, match="carry the last part too"):
        assemble(tmp_path / "bundle", tmp_path / "out")
