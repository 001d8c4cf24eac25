"""Batch jobs that run inside the controller: many prompts, bounded concurrency, results on disk.

A job's life::

    submit ─▶ queued ─▶ running ─▶ completed      (every prompt has a result line)
                          │  │ └──▶ cancelled      (DELETE /jobs/{id}: unrun prompts get error lines)
                          │  └───▶ failed         (an unexpected error: unrun prompts get error lines)
                          └──▶ interrupted ─▶ running   (the server stopped or crashed; resumed by
                                                         the next server on the same directory)

The input is copied to ``<jobs_dir>/<id>/`` at submit time and each finished prompt is appended
to its ``results.jsonl`` as it completes (job_store.py; a job's run is job_runner.py's).
``close()`` (``pdserve down``) lets the prompts in flight finish for a moment, then aborts the
rest and marks the job interrupted; a new JobManager on the same directory lists every job,
marks the ones it finds queued or running (a crash) as interrupted, and ``resume()`` runs, once
each, exactly the prompts without a result line: a prompt in flight at the crash runs again,
one that has a line never does.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pdserve.cluster.serving.job_runner import CANCELLED, SHUT_DOWN, Generator, Job, JobRunner
from pdserve.cluster.serving.job_store import (
    JOB_FILE,
    RESULTS_FILE,
    JobInfo,
    Prompt,
    ResultsFile,
    check_prompt,
    load_info,
    load_input,
    lock_dir,
    save_input,
)
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)

MAX_JOB_PROMPTS = 100_000
MAX_NAME_CHARS = 200
DRAIN_S = 5.0  # on close, how long prompts in flight may finish before they are aborted
CRASHED = "interrupted: the server stopped unexpectedly; the job resumes when a server starts"

__all__ = [
    "CANCELLED",
    "CRASHED",
    "SHUT_DOWN",
    "Generator",
    "JobInfo",
    "JobManager",
    "check_prompt",
]


class JobManager:
    """Runs batch jobs on the caller's event loop and keeps their state under ``jobs_dir``.

    At most ``max_concurrency`` prompts of all jobs together are in flight; a job of more than
    ``max_job_prompts`` prompts is refused. One manager at a time owns a directory (a lock file,
    released by ``close()`` or by the process's death).
    """

    def __init__(
        self,
        frontend: Generator,
        jobs_dir: str | Path,
        max_concurrency: int = 64,
        max_job_prompts: int = MAX_JOB_PROMPTS,
    ) -> None:
        if not str(jobs_dir):
            raise ValueError("jobs_dir is empty: give the directory where job results are kept")
        self.frontend = frontend
        self.dir = Path(jobs_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock: IO[bytes] | None = lock_dir(self.dir)
        self.max_concurrency = max_concurrency
        self.max_job_prompts = max_job_prompts
        self._runner = JobRunner(frontend, max_concurrency)
        self._jobs: dict[str, Job] = {}
        self._load()

    async def submit(
        self, prompts: object, sampling: SamplingParams, name: object = None
    ) -> JobInfo:
        """Start a job; raises InvalidRequestError for a job that cannot run at all (prompts and
        name are checked here, whoever sends them). Its input is on disk before this returns."""
        checked, label = self._check(prompts, name)
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        job_dir = self.dir / job_id
        job_dir.mkdir()
        await asyncio.to_thread(save_input, job_dir, checked, sampling)
        info = JobInfo(job_id, label, "queued", total=len(checked), created=time.time())
        job = Job(info, job_dir, ResultsFile(job_dir / RESULTS_FILE, len(checked)))
        job.results.open_for_append()
        job.save()
        self._jobs[job_id] = job
        job.task = asyncio.get_running_loop().create_task(self._runner.run(job, checked, sampling))
        return dataclasses.replace(info)

    def resume(self) -> builtins.list[str]:
        """Start every interrupted job again (call on the event loop); returns their ids. A job
        whose input cannot be read is failed with the reason instead."""
        resumed = []
        for job in self._jobs.values():
            if job.info.state != "interrupted" or job.task is not None:
                continue
            job.results.open_for_append()
            try:
                prompts, params = load_input(job.dir)
                if len(prompts) != job.info.total:
                    raise ValueError(
                        f"{len(prompts)} prompts on disk, the job has {job.info.total}"
                    )
            except (OSError, ValueError, TypeError, InvalidRequestError) as e:
                job.finish("failed", f"cannot resume: its input is damaged ({e})")
                continue
            job.info.resumed += 1
            job.task = asyncio.get_running_loop().create_task(
                self._runner.run(job, prompts, params)
            )
            resumed.append(job.info.id)
        if resumed:
            logger.info("resuming %d interrupted jobs: %s", len(resumed), resumed)
        return resumed

    def status(self, job_id: str) -> JobInfo:
        """A snapshot of the job's progress; KeyError for an unknown id."""
        return dataclasses.replace(self._jobs[job_id].info)

    def list(self) -> builtins.list[JobInfo]:
        """All jobs, oldest first."""
        infos = [dataclasses.replace(j.info) for j in self._jobs.values()]
        return sorted(infos, key=lambda i: i.created)

    async def cancel(self, job_id: str) -> JobInfo:
        """Stop a queued, running or interrupted job (its in-flight requests are aborted); a
        no-op once done."""
        job = self._jobs[job_id]
        if job.info.state == "interrupted" and job.task is None:  # never resumed
            job.results.open_for_append()
            job.finish("cancelled", None)
        await self._stop([job], ("cancelled", None))
        return self.status(job_id)

    def results_path(self, job_id: str) -> Path:
        return self._jobs[job_id].results.path

    def iter_results(
        self, job_id: str, start: int = 0, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Results in submission order from ``start``, up to the first prompt still running."""
        return self._jobs[job_id].results.read(start, limit)

    async def close(self, drain_s: float = DRAIN_S) -> None:
        """Stop every running job: no new prompt starts, those in flight have ``drain_s`` to
        finish, then the rest are aborted; the jobs are left interrupted (resumable)."""
        running = [j for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for job in running:
            job.draining = True
        if running and drain_s > 0:
            await asyncio.wait([j.task for j in running if j.task is not None], timeout=drain_s)
        await self._stop(running, ("interrupted", SHUT_DOWN))
        for job in self._jobs.values():
            job.results.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _check(self, prompts: object, name: object) -> tuple[builtins.list[Prompt], str | None]:
        if not isinstance(prompts, list) or not prompts:
            raise InvalidRequestError("prompts must be a non-empty list of prompts")
        if len(prompts) > self.max_job_prompts:
            raise InvalidRequestError(
                f"a job holds at most {self.max_job_prompts} prompts, this one has "
                f"{len(prompts)}: split it into several jobs"
            )
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
            raise InvalidRequestError(f"name must be a string of at most {MAX_NAME_CHARS} chars")
        return [check_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)], name

    async def _stop(self, jobs: builtins.list[Job], reason: tuple[str, str | None]) -> None:
        running = [j for j in jobs if j.task is not None and not j.task.done()]
        for job in running:
            job.stop = reason
            assert job.task is not None
            job.task.cancel()
        if running:
            await asyncio.wait([j.task for j in running if j.task is not None])
        for job in running:
            if not job.started:  # cancelled before its run began: nothing cleaned up yet
                job.finish(*reason)

    def _load(self) -> None:
        """List the jobs on disk; one found queued or running was cut off by a crash: its counts
        are re-read from its results (job.json may lag them) and it is marked interrupted."""
        for path in sorted(self.dir.glob(f"*/{JOB_FILE}")):
            try:
                info = load_info(path.parent)
            except (OSError, ValueError, TypeError) as e:
                logger.warning("skipping job directory %s: unreadable job.json (%s)", path, e)
                continue
            job = Job(info, path.parent, ResultsFile(path.parent / RESULTS_FILE, info.total))
            self._jobs[info.id] = job
            if not info.done:
                info.completed, info.failed = job.results.index()
                if info.state != "interrupted":
                    info.error = CRASHED
                job.set_state("interrupted")
