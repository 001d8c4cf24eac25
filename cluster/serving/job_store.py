"""On-disk state of one batch job: ``job.json`` (its JobInfo) and ``results.jsonl``.

Results are appended in completion order, one JSON line each, flushed per line, so a crash loses
at most the line being written. A byte-offset index per prompt lets readers page through them in
submission order without scanning or sorting the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
RESULTS_FILE = "results.jsonl"
TERMINAL_STATES = ("completed", "cancelled", "failed")


@dataclass
class JobInfo:
    """A batch job's progress. ``completed`` and ``failed`` are disjoint counts of prompts that
    ran (``failed``: the prompt was invalid or its request failed); prompts a cancelled or
    interrupted job never ran count in neither, though their results are error lines too."""

    id: str
    name: str | None
    state: str  # queued | running | completed | cancelled | failed
    total: int
    completed: int = 0
    failed: int = 0
    created: float = 0.0  # unix time
    finished: float | None = None
    error: str | None = None  # why the job failed (e.g. interrupted by a restart)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def save_info(job_dir: Path, info: JobInfo) -> None:
    """Write job.json atomically (temp file + rename), so readers never see half a file."""
    tmp = job_dir / (JOB_FILE + ".tmp")
    tmp.write_text(json.dumps(info.to_dict()), encoding="utf-8")
    os.replace(tmp, job_dir / JOB_FILE)


def load_info(job_dir: Path) -> JobInfo:
    return JobInfo.from_dict(json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8")))


class ResultsFile:
    """Append-only ``results.jsonl`` of one job plus the index that reads it in prompt order.

    ``ready`` is the length of the written prefix: results ``0 .. ready-1`` all exist, so paging
    with ``read(start)`` never skips a result that is still running.
    """

    def __init__(self, path: Path, total: int) -> None:
        self.path = path
        self.total = total
        self.offsets = array("q", [-1]) * total  # offsets[i]: byte offset of result i, -1 if none
        self.ready = 0
        self.indexed = False  # offsets reflect the file (always true once opened for append)
        self._out: IO[bytes] | None = None

    def open_for_append(self) -> None:
        self.index()
        self._out = open(self.path, "ab")  # noqa: SIM115 (kept open for the job's life)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def append(self, result: dict[str, Any]) -> None:
        assert self._out is not None, "open_for_append first"
        index = result["index"]
        assert self.offsets[index] < 0, f"result {index} written twice"
        line = json.dumps(result, ensure_ascii=False).encode("utf-8") + b"\n"
        pos = self._out.tell()
        self._out.write(line)
        self._out.flush()  # readers and a later restart see every finished line
        self._set(index, pos)

    def missing(self) -> list[int]:
        """Indices without a result yet."""
        self.index()
        return [i for i in range(self.total) if self.offsets[i] < 0]

    def read(self, start: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Results ``start ..`` of the written prefix, in submission order."""
        self.index()
        stop = self.ready if limit is None else min(self.ready, start + limit)
        if start >= stop:
            return
        with open(self.path, "rb") as f:
            for i in range(start, stop):
                f.seek(self.offsets[i])
                yield json.loads(f.readline())

    def index(self) -> tuple[int, int]:
        """Build the offsets from the file once; returns (ok results, error results) in it.

        A torn last line (a crash mid-write) is cut off so later appends start on a fresh line.
        """
        counts = [0, 0]
        if self.indexed or not self.path.exists():
            self.indexed = True
            return counts[0], counts[1]
        good_end = 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn by a crash mid-write
                try:
                    result = json.loads(line)
                    index = int(result["index"])
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s: unreadable line at byte %d, skipped", self.path, good_end)
                    index = -1
                if 0 <= index < self.total and self.offsets[index] < 0:
                    self._set(index, good_end)
                    counts[result.get("error") is not None] += 1
                good_end += len(line)
        if good_end < self.path.stat().st_size:
            os.truncate(self.path, good_end)
        self.indexed = True
        return counts[0], counts[1]

    def _set(self, index: int, pos: int) -> None:
        self.offsets[index] = pos
        while self.ready < self.total and self.offsets[self.ready] >= 0:
            self.ready += 1
