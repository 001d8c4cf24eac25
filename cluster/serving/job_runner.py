"""One batch job's record and its run: the prompts without a result line, at most
``max_concurrency`` of all jobs in flight at once, each finished prompt appended to the job's
``results.jsonl`` as it completes (``job_store.py``), and the job's state saved as it changes.

``JobManager`` (``jobs.py``) creates, lists, resumes, cancels and closes the jobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from pdserve.cluster.serving.job_store import JobInfo, Prompt, ResultsFile, result_line, save_info
from pdserve.engine.request import RequestOutput
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.router.frontend import QueueFullError, RequestFailedError

logger = logging.getLogger(__name__)

SAVE_EVERY_S = 1.0  # job.json progress refresh while running (state changes save at once)
CANCELLED = "cancelled: the job was cancelled before this prompt finished"
SHUT_DOWN = "interrupted: the server stopped; the job resumes when a server starts again"


class Generator(Protocol):
    """What a job needs from the Frontend."""

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestOutput: ...


@dataclasses.dataclass
class Job:
    """A job as its manager holds it: its record, its directory and results, its run."""

    info: JobInfo
    dir: Path
    results: ResultsFile
    task: asyncio.Task[None] | None = None
    stop: tuple[str, str | None] = ("cancelled", None)  # (state, error) if the task is cancelled
    started: bool = False  # its run began (and so finishes the job itself)
    draining: bool = False  # take no new prompt: the server is stopping
    saved_at: float = 0.0

    def finish(self, state: str, error: str | None) -> None:
        """End the job's run: a terminal state fills every prompt without a line with an error
        line; ``interrupted`` leaves them for the resume."""
        if state != "interrupted":
            filler = CANCELLED if state == "cancelled" else (error or "failed")
            for index in self.results.missing():
                self.results.append(result_line(index, None, None, filler))
            self.info.finished = time.time()
        self.results.close()
        self.info.error = error
        self.set_state(state)
        logger.info("job %s %s: %s", self.info.id, state, self.info)

    def set_state(self, state: str) -> None:
        self.info.state = state
        self.save()

    def save(self) -> None:
        save_info(self.dir, self.info)
        self.saved_at = time.monotonic()


class JobRunner:
    """Runs jobs' prompts through the frontend, sharing ``max_concurrency`` slots among them."""

    def __init__(self, frontend: Generator, max_concurrency: int) -> None:
        self.frontend = frontend
        self.max_concurrency = max_concurrency
        self._slots = asyncio.Semaphore(max_concurrency)

    async def run(self, job: Job, prompts: list[Prompt], params: SamplingParams) -> None:
        """Run the prompts that have no result line yet (all of them, unless resumed)."""
        job.started = True
        job.info.error = None
        job.set_state("running")
        missing = [(i, prompts[i]) for i in job.results.missing()]
        todo = iter(missing)  # shared by the workers, so each prompt runs once
        n = min(self.max_concurrency, len(missing))
        workers = [asyncio.ensure_future(self._work(job, todo, params)) for _ in range(n)]
        try:
            await asyncio.gather(*workers)
            done = not job.results.missing()
            state, error = ("completed", None) if done else ("interrupted", SHUT_DOWN)
        except asyncio.CancelledError:  # cancel() or close(): they set job.stop first
            state, error = job.stop
        except Exception as e:
            logger.exception("job %s failed", job.info.id)
            state, error = "failed", f"{type(e).__name__}: {e}"
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        job.finish(state, error)

    async def _work(
        self, job: Job, todo: Iterator[tuple[int, Prompt]], params: SamplingParams
    ) -> None:
        for index, prompt in todo:
            if job.draining:
                return  # the prompt keeps no line: a resumed job runs it
            async with self._slots:
                if job.draining:
                    return
                result = await self._one(f"{job.info.id}-{index}", index, prompt, params)
            job.results.append(result)
            if result["error"] is None:
                job.info.completed += 1
            else:
                job.info.failed += 1
            if time.monotonic() - job.saved_at > SAVE_EVERY_S:
                job.save()

    async def _one(
        self, request_id: str, index: int, prompt: Prompt, params: SamplingParams
    ) -> dict[str, Any]:
        while True:
            try:
                out = await self.frontend.generate(prompt, params, request_id)
                return result_line(index, prompt, out, None)
            except QueueFullError as e:  # the cluster is busy: back off rather than fail
                await asyncio.sleep(e.retry_after)
            except (InvalidRequestError, RequestFailedError) as e:
                return result_line(index, prompt, None, str(e))
