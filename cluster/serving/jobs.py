"""Batch jobs that run inside the controller: many prompts, bounded concurrency, results on disk.

A job's life::

    submit ─▶ queued ─▶ running ─▶ completed      (every prompt has a result line)
                          │    └──▶ cancelled      (DELETE /jobs/{id}: unrun prompts get error lines)
                          └──────▶ failed         (an unexpected error, or interrupted by a restart)

Each finished prompt is appended to ``<jobs_dir>/<id>/results.jsonl`` as it completes, so a
client that goes away and comes back reads everything; a new JobManager on the same directory
lists old jobs and marks the ones that were running as failed (interrupted).
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from pdserve.cluster.serving.job_store import (
    JOB_FILE,
    RESULTS_FILE,
    JobInfo,
    ResultsFile,
    load_info,
    save_info,
)
from pdserve.engine.request import RequestMetrics, RequestOutput
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.tokenizer import encode_prompt
from pdserve.router.frontend import QueueFullError, RequestFailedError

logger = logging.getLogger(__name__)

Prompt = str | list[int]
MAX_JOB_PROMPTS = 100_000
MAX_NAME_CHARS = 200
SAVE_EVERY_S = 1.0  # job.json progress refresh while running (state changes save at once)
CANCELLED = "cancelled: the job was cancelled before this prompt finished"
SHUT_DOWN = "interrupted: the server shut down before the job finished; submit it again"
RESTARTED = "interrupted: the server restarted while the job ran; submit it again"

__all__ = ["JobInfo", "JobManager"]


class Generator(Protocol):
    """What a job needs from the Frontend."""

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestOutput: ...


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


def empty_as_ids(prompt: Prompt, tokenizer: PreTrainedTokenizerBase | None) -> Prompt:
    """An empty text prompt as its token ids (BOS alone, where the tokenizer adds one), as
    /v1/completions tokenizes it: vLLM's rule, under which only a prompt of no tokens is refused
    (encode_prompt raises InvalidRequestError then). Other prompts pass as they are."""
    if prompt == "" and tokenizer is not None:
        return encode_prompt(tokenizer, prompt)
    return prompt


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


def _result(
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


@dataclasses.dataclass
class _Job:
    info: JobInfo
    dir: Path
    results: ResultsFile
    task: asyncio.Task[None] | None = None
    stop: tuple[str, str | None] = ("cancelled", None)  # (state, error) if the task is cancelled
    saved_at: float = 0.0


class JobManager:
    """Runs batch jobs on the caller's event loop and keeps their state under ``jobs_dir``.

    At most ``max_concurrency`` prompts of all jobs together are in flight; a job of more than
    ``max_job_prompts`` prompts is refused.
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
        self.max_concurrency = max_concurrency
        self.max_job_prompts = max_job_prompts
        self._slots = asyncio.Semaphore(max_concurrency)
        self._jobs: dict[str, _Job] = {}
        self._load()

    async def submit(
        self, prompts: object, sampling: SamplingParams, name: object = None
    ) -> JobInfo:
        """Start a job; raises InvalidRequestError for a job that cannot run at all (prompts and
        name are checked here, whoever sends them)."""
        checked, label = self._check(prompts, name)
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        job_dir = self.dir / job_id
        job_dir.mkdir()
        info = JobInfo(job_id, label, "queued", total=len(checked), created=time.time())
        job = _Job(info, job_dir, ResultsFile(job_dir / RESULTS_FILE, len(checked)))
        job.results.open_for_append()
        self._save(job)
        self._jobs[job_id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, checked, sampling))
        return dataclasses.replace(info)

    def status(self, job_id: str) -> JobInfo:
        """A snapshot of the job's progress; KeyError for an unknown id."""
        return dataclasses.replace(self._jobs[job_id].info)

    def list(self) -> list[JobInfo]:
        """All jobs, oldest first."""
        infos = [dataclasses.replace(j.info) for j in self._jobs.values()]
        return sorted(infos, key=lambda i: i.created)

    async def cancel(self, job_id: str) -> JobInfo:
        """Stop a queued or running job (its in-flight requests are aborted); a no-op once done."""
        await self._stop([self._jobs[job_id]], ("cancelled", None))
        return self.status(job_id)

    def results_path(self, job_id: str) -> Path:
        return self._jobs[job_id].results.path

    def iter_results(
        self, job_id: str, start: int = 0, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Results in submission order from ``start``, up to the first prompt still running."""
        return self._jobs[job_id].results.read(start, limit)

    async def close(self) -> None:
        """Stop every running job (marked failed: interrupted) and close the result files."""
        await self._stop(list(self._jobs.values()), ("failed", SHUT_DOWN))
        for job in self._jobs.values():
            job.results.close()

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

    async def _run(self, job: _Job, prompts: builtins.list[Prompt], params: SamplingParams) -> None:
        self._set_state(job, "running")
        todo: Iterator[tuple[int, Prompt]] = iter(enumerate(prompts))  # shared: each runs once
        workers = [
            asyncio.ensure_future(self._work(job, todo, params))
            for _ in range(min(self.max_concurrency, len(prompts)))
        ]
        try:
            await asyncio.gather(*workers)
            state, error = "completed", None
        except asyncio.CancelledError:  # cancel() or close(): they set job.stop first
            state, error = job.stop
        except Exception as e:
            logger.exception("job %s failed", job.info.id)
            state, error = "failed", f"{type(e).__name__}: {e}"
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        self._finish(job, state, error)

    async def _work(
        self, job: _Job, todo: Iterator[tuple[int, Prompt]], params: SamplingParams
    ) -> None:
        for index, prompt in todo:
            async with self._slots:
                result = await self._one(f"{job.info.id}-{index}", index, prompt, params)
            job.results.append(result)
            if result["error"] is None:
                job.info.completed += 1
            else:
                job.info.failed += 1
            if time.monotonic() - job.saved_at > SAVE_EVERY_S:
                self._save(job)

    async def _one(
        self, request_id: str, index: int, prompt: Prompt, params: SamplingParams
    ) -> dict[str, Any]:
        tokenizer = getattr(self.frontend, "tokenizer", None)
        while True:
            try:
                out = await self.frontend.generate(
                    empty_as_ids(prompt, tokenizer), params, request_id
                )
                return _result(index, prompt, out, None)
            except QueueFullError as e:  # the cluster is busy: back off rather than fail
                await asyncio.sleep(e.retry_after)
            except (InvalidRequestError, RequestFailedError) as e:
                return _result(index, prompt, None, str(e))

    async def _stop(self, jobs: builtins.list[_Job], reason: tuple[str, str | None]) -> None:
        running = [j for j in jobs if j.task is not None and not j.task.done()]
        for job in running:
            job.stop = reason
            assert job.task is not None
            job.task.cancel()
        if running:
            await asyncio.wait([j.task for j in running if j.task is not None])
        for job in running:
            if not job.info.done:  # cancelled before _run started: nothing cleaned up yet
                self._finish(job, *reason)

    def _finish(self, job: _Job, state: str, error: str | None) -> None:
        filler = CANCELLED if state == "cancelled" else (error or "failed")
        for index in job.results.missing():
            job.results.append(_result(index, None, None, filler))
        job.results.close()
        job.info.finished = time.time()
        job.info.error = error
        self._set_state(job, state)
        logger.info("job %s %s: %s", job.info.id, state, job.info)

    def _set_state(self, job: _Job, state: str) -> None:
        job.info.state = state
        self._save(job)

    def _save(self, job: _Job) -> None:
        save_info(job.dir, job.info)
        job.saved_at = time.monotonic()

    def _load(self) -> None:
        for path in sorted(self.dir.glob(f"*/{JOB_FILE}")):
            try:
                info = load_info(path.parent)
            except (OSError, ValueError, TypeError) as e:
                logger.warning("skipping job directory %s: unreadable job.json (%s)", path, e)
                continue
            job = _Job(info, path.parent, ResultsFile(path.parent / RESULTS_FILE, info.total))
            self._jobs[info.id] = job
            if not info.done:  # it was running when the previous server stopped
                info.completed, info.failed = job.results.index()
                job.results.open_for_append()
                self._finish(job, "failed", RESTARTED)
