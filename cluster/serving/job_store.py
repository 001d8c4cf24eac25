"""On-disk state of one batch job, in ``<jobs_dir>/<id>/``:

- ``prompts.jsonl`` and ``sampling.json``: the job's input, copied at submit time (written
  before ``job.json``, so a directory with a ``job.json`` can always be resumed);
- ``job.json``: its JobInfo, rewritten atomically (temp file, fsync, rename);
- ``results.jsonl``: one JSON line per finished prompt, appended in completion order and flushed
  per line, so a crash loses at most the line being written (cut off on the next open).

A byte-offset index per prompt lets readers page through results in submission order without
scanning or sorting the file; it keeps the first line of each prompt index, so a result is never
read or counted twice, and ``missing()`` is exactly the prompts a resumed job must run again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pdserve.engine.request import RequestMetrics, RequestOutput
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
RESULTS_FILE = "results.jsonl"
PROMPTS_FILE = "prompts.jsonl"
SAMPLING_FILE = "sampling.json"
LOCK_FILE = ".lock"
Prompt = str | list[int]
TERMINAL_STATES = ("completed", "cancelled", "failed")
# queued -> running -> completed | cancelled | failed; running -> interrupted (the server stopped
# or crashed) -> running again when a server starts on the same jobs directory
STATES = ("queued", "running", "interrupted", *TERMINAL_STATES)


@dataclass
class JobInfo:
    """A batch job's progress. ``completed`` and ``failed`` are disjoint counts of prompts that
    ran (``failed``: the prompt was invalid or its request failed); prompts a cancelled or
    cancelled or failed job never ran count in neither, though their results are error lines too;
    an interrupted job has no line for them until it is resumed. ``resumed`` counts the restarts
    it survived."""

    id: str
    name: str | None
    state: str  # one of STATES
    total: int
    completed: int = 0
    failed: int = 0
    created: float = 0.0  # unix time
    finished: float | None = None
    error: str | None = None  # why the job failed, or why it is interrupted
    resumed: int = 0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_prompt(prompt: object, where: str = "prompt") -> Prompt:
    """A prompt is text or a non-empty list of token ids; anything else names what to send."""
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return prompt
    raise InvalidRequestError(
        f"{where} must be a string or a non-empty list of token ids (ints >= 0), "
        f"not {type(prompt).__name__}"
    )


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: a reader (or a crash) sees the old file or the
    new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_info(job_dir: Path, info: JobInfo) -> None:
    write_atomic(job_dir / JOB_FILE, json.dumps(info.to_dict()).encode("utf-8"))


def load_info(job_dir: Path) -> JobInfo:
    return JobInfo.from_dict(json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8")))


def save_input(job_dir: Path, prompts: list[Prompt], params: SamplingParams) -> None:
    """The job's prompts (one JSON value a line) and sampling settings, for a later resume."""
    lines = b"".join(json.dumps(p, ensure_ascii=False).encode("utf-8") + b"\n" for p in prompts)
    write_atomic(job_dir / PROMPTS_FILE, lines)
    write_atomic(job_dir / SAMPLING_FILE, json.dumps(dataclasses.asdict(params)).encode("utf-8"))


def load_input(job_dir: Path) -> tuple[list[Prompt], SamplingParams]:
    """What ``save_input`` wrote (OSError, ValueError or InvalidRequestError if it is damaged)."""
    with open(job_dir / PROMPTS_FILE, "rb") as f:
        prompts = [json.loads(line) for line in f]
    sampling = json.loads((job_dir / SAMPLING_FILE).read_text(encoding="utf-8"))
    return prompts, SamplingParams(**sampling)


def metrics_dict(m: RequestMetrics) -> dict[str, Any]:
    return {
        "ttft": m.ttft,
        "tpot": m.tpot,
        "e2e": m.e2e,
        "queue_s": m.queue_s,
        "prefill_s": m.prefill_s,
        "transfer_s": m.transfer_s,
        "kv_wait_s": m.kv_wait_s,
        "kv_bytes": m.kv_bytes,
        "num_output_tokens": m.num_output_tokens,
    }


def result_line(
    index: int, prompt: Prompt | None, out: RequestOutput | None, error: str | None
) -> dict[str, Any]:
    """One line of results.jsonl (``prompt`` is None for token-id prompts)."""
    return {
        "index": index,
        "request_id": out.request_id if out else None,
        "prompt": prompt if isinstance(prompt, str) else None,
        "text": out.text if out else None,
        "token_ids": out.token_ids if out else [],
        "finish_reason": out.finish_reason if out else None,
        "metrics": metrics_dict(out.metrics) if out else None,
        "error": error,
    }


def lock_dir(jobs_dir: Path) -> IO[bytes]:
    """Hold ``jobs_dir``'s lock file, or raise RuntimeError: two servers resuming the same jobs
    would run their prompts twice."""
    f = open(jobs_dir / LOCK_FILE, "ab")  # noqa: SIM115 (held until close())
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RuntimeError(
            f"the jobs directory {jobs_dir} is in use by another pdserve server (the same "
            "deployment name?): stop it first or give this one another name"
        ) from None
    return f


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
