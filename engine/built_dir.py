"""Directories built once and reused: the tiny test models, the benchmark models and converted
GGUF files all live in the pdserve cache as directories that take seconds to build.

``build_once`` builds into a temporary directory beside the target and renames it into place,
so a reader never sees half a model; concurrent builders (TP ranks, decode replicas and the
driver on one node) serialise on a lock file, so the node builds once; a marker file, written
last and holding the build's stamp, says a directory is finished and for which inputs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def build_once(
    out: Path,
    marker_name: str,
    stamp: dict[str, Any],
    build: Callable[[Path], None],
    what: str,
    *,
    owned: bool = False,
) -> Path:
    """``out``, built by ``build(tmp_dir)`` unless its marker already holds ``stamp``.

    A directory whose marker holds another stamp is rebuilt. A non-empty directory without a
    marker is refused (``what`` names the thing in the error) unless ``owned`` (a cache
    directory nobody else writes into), where it is the remains of a crashed build and goes.
    """
    if _finished(out, marker_name, stamp):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / f".{out.name}.lock"):
        if _finished(out, marker_name, stamp):  # built by another process while we waited
            return out
        marked = (out / marker_name).is_file()
        if out.exists() and any(out.iterdir()) and not marked and not owned:
            raise ValueError(f"{out} exists and is not a {what}; choose an empty directory")
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a crashed build's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / marker_name).write_text(json.dumps(stamp, indent=2))
            if out.exists():  # another stamp's build, or an owned leftover
                shutil.rmtree(out)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _finished(out: Path, marker_name: str, stamp: dict[str, Any]) -> bool:
    marker = out / marker_name
    return marker.is_file() and json.loads(marker.read_text()) == stamp


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive flock on lock_file; the OS releases it if this process dies."""
    with lock_file.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
