"""JobManager over a fake frontend: ordering, on-disk state, cancel, restart, bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _fake_jobs_frontend import FakeFrontend, expected_text

from pdserve.cluster.serving.job_store import JobInfo, load_info
from pdserve.cluster.serving.jobs import CANCELLED, JobManager
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams

PARAMS = SamplingParams(max_tokens=6)


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


async def run_to_end(jm: JobManager, prompts: list[Any], **kw: Any) -> JobInfo:
    info = await jm.submit(prompts, PARAMS, **kw)
    await until(lambda: jm.status(info.id).done)
    return jm.status(info.id)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_200_prompts_give_200_results_in_submission_order(tmp_path: Path) -> None:
    prompts: list[Any] = [f"prompt {i}" for i in range(200)]
    prompts[7], prompts[50], prompts[99] = "bad one", "", "fail here"  # per-prompt failures
    prompts[120] = [7, 8, 9]  # token ids

    async def main() -> tuple[JobInfo, str, JobManager]:
        jm = JobManager(FakeFrontend(jitter_s=0.004), tmp_path, max_concurrency=16)
        info = await jm.submit(prompts, PARAMS, name="batch")
        queued_on_disk = load_info(tmp_path / info.id).state
        await until(lambda: jm.status(info.id).done)
        return jm.status(info.id), queued_on_disk, jm

    info, queued_on_disk, jm = asyncio.run(main())
    assert queued_on_disk == "queued"
    assert (info.state, info.name, info.total, info.completed, info.failed) == (
        "completed", "batch", 200, 197, 3,
    )  # fmt: skip
    assert info.finished is not None and info.finished >= info.created
    results = list(jm.iter_results(info.id))
    assert [r["index"] for r in results] == list(range(200))
    for i in (0, 1, 199):
        assert results[i]["text"] == expected_text(f"prompt {i}", 6)
        assert results[i]["prompt"] == f"prompt {i}" and results[i]["error"] is None
        assert results[i]["token_ids"] == [ord(c) for c in results[i]["text"]]
        assert results[i]["finish_reason"] == "length" and results[i]["metrics"]["e2e"] > 0
    assert "bad prompt" in results[7]["error"] and results[7]["text"] is None
    assert "send a good one" in results[50]["error"]
    assert "worker lost" in results[99]["error"]
    assert results[120]["prompt"] is None and results[120]["text"] == "HIJ"
    on_disk = lines(jm.results_path(info.id))  # completion order: sorted only when read
    assert sorted(r["index"] for r in on_disk) == list(range(200))
    assert [r["index"] for r in on_disk] != list(range(200))
    assert load_info(tmp_path / info.id) == info


def test_results_readable_while_running_then_cancel_aborts_the_rest(tmp_path: Path) -> None:
    prompts = [f"p{i}" for i in range(30)] + [f"hold {i}" for i in range(170)]
    fe = FakeFrontend()

    async def main() -> None:
        jm = JobManager(fe, tmp_path, max_concurrency=16)
        job = (await jm.submit(prompts, PARAMS)).id
        await until(lambda: jm.status(job).completed == 30 and len(fe.aborted) == 0)
        await asyncio.sleep(0.02)  # the hold prompts are in flight
        assert jm.status(job).state == "running" and load_info(tmp_path / job).state == "running"
        assert [r["index"] for r in jm.iter_results(job)] == list(range(30))
        assert [r["index"] for r in jm.iter_results(job, start=10, limit=5)] == list(range(10, 15))
        info = await jm.cancel(job)
        assert (info.state, info.completed, info.failed) == ("cancelled", 30, 0)
        assert info.finished is not None and load_info(tmp_path / job).state == "cancelled"
        assert len(fe.aborted) == 16  # every in-flight request was aborted, none started after
        results = list(jm.iter_results(job))
        assert len(results) == 200 and all(r["error"] == CANCELLED for r in results[30:])
        assert (await jm.cancel(job)).state == "cancelled"  # idempotent

    asyncio.run(main())


def test_a_busy_cluster_is_retried_not_failed(tmp_path: Path) -> None:
    fe = FakeFrontend()
    fe.full_left = 5  # QueueFullError five times

    async def main() -> JobInfo:
        return await run_to_end(JobManager(fe, tmp_path, max_concurrency=4), ["q"] * 20)

    info = asyncio.run(main())
    assert (info.state, info.completed, info.failed) == ("completed", 20, 0)


def test_an_unexpected_error_fails_the_job_and_fills_every_result(tmp_path: Path) -> None:
    fe = FakeFrontend()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk on fire")

    fe.generate = broken  # type: ignore[method-assign]

    async def main() -> tuple[JobInfo, list[dict[str, Any]]]:
        jm = JobManager(fe, tmp_path)
        info = await run_to_end(jm, ["a", "b"])
        return info, list(jm.iter_results(info.id))

    info, results = asyncio.run(main())
    assert info.state == "failed" and "disk on fire" in (info.error or "")
    assert len(results) == 2 and all("disk on fire" in r["error"] for r in results)


@pytest.mark.parametrize(
    ("prompts", "name", "message"),
    [
        ([], None, "non-empty list"),
        (["a"] * 11, None, "at most 10 prompts"),
        (["a", {"text": "b"}], None, "prompts[1]"),
        (["a", [1, -2]], None, "prompts[1]"),
        (["a"], "n" * 201, "name"),
    ],
)
def test_jobs_that_cannot_run_are_refused(
    tmp_path: Path, prompts: list[Any], name: str | None, message: str
) -> None:
    async def main() -> None:
        await JobManager(FakeFrontend(), tmp_path, max_job_prompts=10).submit(prompts, PARAMS, name)

    with pytest.raises(InvalidRequestError, match=message.replace("[", r"\[")):
        asyncio.run(main())
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # no job written for a refusal


def test_unknown_jobs_and_empty_dirs_are_errors(tmp_path: Path) -> None:
    jm = JobManager(FakeFrontend(), tmp_path)
    with pytest.raises(KeyError):
        jm.status("job-nope")
    with pytest.raises(ValueError, match="jobs_dir is empty"):
        JobManager(FakeFrontend(), "")
