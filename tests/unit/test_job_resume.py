"""Durable jobs: the store (atomic state, input copies, deduped results) and resuming a job after
a clean stop or a crash, over a fake frontend."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from _fake_jobs_frontend import FakeFrontend, expected_text
from test_jobs import PARAMS, lines, run_to_end, until

from pdserve.cluster.serving import job_store
from pdserve.cluster.serving.job_store import (
    JobInfo,
    ResultsFile,
    load_info,
    load_input,
    result_line,
    save_info,
    save_input,
)
from pdserve.cluster.serving.jobs import CANCELLED, CRASHED, JobManager
from pdserve.engine.sampling_params import SamplingParams


def test_results_file_keeps_the_first_line_per_prompt_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    rows = [result_line(i, f"p{i}", None, None if i != 3 else "boom") for i in (0, 3, 1, 0)]
    rows[3]["text"] = "a second line for prompt 0"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n" + '{"index": 2, "te')
    results = ResultsFile(path, total=5)
    assert results.index() == (2, 1)  # 0 and 1 ok, 3 failed; the duplicate of 0 counts nothing
    assert results.missing() == [2, 4] and results.ready == 2
    assert [r["index"] for r in results.read()] == [0, 1]
    assert next(results.read())["text"] is None  # the first line of prompt 0 wins
    assert path.read_bytes().endswith(b"not json\n")  # the torn tail is gone
    results.open_for_append()
    results.append(result_line(2, "p2", None, None))
    results.close()
    again = ResultsFile(path, total=5)
    assert again.missing() == [4] and [r["index"] for r in again.read()] == [0, 1, 2, 3]
    with pytest.raises(AssertionError, match="written twice"):
        again.open_for_append()
        again.append(result_line(3, "p3", None, None))


def test_state_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = JobInfo("job-1", None, "running", total=4, completed=1)
    save_info(tmp_path, old)

    def crash(src: Any, dst: Any) -> None:
        raise OSError("killed between write and rename")

    monkeypatch.setattr(job_store.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        save_info(tmp_path, JobInfo("job-1", None, "running", total=4, completed=3))
    assert load_info(tmp_path) == old  # the old state, whole; the half-done temp file is ignored
    monkeypatch.undo()
    save_info(tmp_path, JobInfo("job-1", None, "completed", total=4, completed=4))
    assert load_info(tmp_path).state == "completed"
    assert sorted(os.listdir(tmp_path)) == ["job.json"]


def test_input_round_trips(tmp_path: Path) -> None:
    prompts: list[Any] = ["naïve café 🙂", "", "line\nbreak", [5, 0, 7]]
    params = SamplingParams(max_tokens=3, stop=["x"], logit_bias={4: -2.5}, seed=2**63, top_k=5)
    save_input(tmp_path, prompts, params)
    assert load_input(tmp_path) == (prompts, params)


def test_a_crashed_job_resumes_with_one_result_per_prompt(tmp_path: Path) -> None:
    """The disk as a crash leaves it (results of 2 of 10, 8 in flight, a torn line, job.json not
    refreshed since submit): a new manager re-reads the counts, marks the job interrupted, and
    resume() runs exactly the 8 prompts without a line."""
    old, new = tmp_path / "old", tmp_path / "new"
    prompts = ["x", "y"] + [f"hold {i}" for i in range(8)]

    async def before_crash() -> str:
        jm = JobManager(FakeFrontend(), old)
        job = (await jm.submit(prompts, PARAMS)).id
        await until(lambda: jm.status(job).completed == 2)
        shutil.copytree(old, new)
        with open(new / job / "results.jsonl", "a") as f:
            f.write('{"index": 5, "te')  # torn by the crash mid-line
        save_info(new / job, JobInfo(job, None, "running", total=10, created=1.0))  # stale
        await jm.close(drain_s=0)
        return job

    job = asyncio.run(before_crash())
    fe = FakeFrontend()
    fe.release.set()

    async def after_restart() -> JobInfo:
        jm = JobManager(fe, new)
        info = jm.status(job)
        assert (info.state, info.error, info.completed, info.resumed) == (
            "interrupted", CRASHED, 2, 0,
        )  # fmt: skip
        assert load_info(new / job) == info
        assert jm.resume() == [job]
        await until(lambda: jm.status(job).done)
        await jm.close()
        return jm.status(job)

    info = asyncio.run(after_restart())
    assert (info.state, info.completed, info.failed, info.resumed) == ("completed", 10, 0, 1)
    assert info.error is None and load_info(new / job) == info
    assert sorted(fe.finished) == sorted(f"{job}-{i}" for i in range(2, 10))  # no prompt twice
    on_disk = lines(new / job / "results.jsonl")
    assert sorted(r["index"] for r in on_disk) == list(range(10))  # one line each
    assert [r["text"] for r in on_disk if r["index"] < 2] == ["X", "Y"]
    assert all(r["text"] == expected_text(prompts[r["index"]], 6) for r in on_disk)


def test_close_drains_then_leaves_the_job_interrupted_and_a_new_server_finishes_it(
    tmp_path: Path,
) -> None:
    prompts = [f"slow {i}" for i in range(6)]  # 0.3 s each, 2 at a time

    async def first_server() -> tuple[str, JobInfo]:
        jm = JobManager(FakeFrontend(), tmp_path, max_concurrency=2)
        job = (await jm.submit(prompts, PARAMS)).id
        await asyncio.sleep(0.1)  # prompts 0 and 1 are in flight
        await jm.close(drain_s=5)
        return job, jm.status(job)

    job, stopped = asyncio.run(first_server())
    assert (stopped.state, stopped.completed, stopped.finished) == ("interrupted", 2, None)
    assert "resumes" in (stopped.error or "") and load_info(tmp_path / job) == stopped
    assert sorted(r["index"] for r in lines(tmp_path / job / "results.jsonl")) == [0, 1]
    fe = FakeFrontend()

    async def second_server() -> JobInfo:
        jm = JobManager(fe, tmp_path, max_concurrency=2)
        assert jm.status(job) == stopped  # a clean stop's state needs no repair
        assert jm.resume() == [job]
        await until(lambda: jm.status(job).done)
        assert [r["index"] for r in jm.iter_results(job)] == list(range(6))
        return jm.status(job)

    info = asyncio.run(second_server())
    assert (info.state, info.completed, info.resumed) == ("completed", 6, 1)
    assert sorted(fe.finished) == [f"{job}-{i}" for i in range(2, 6)]


def test_damaged_input_fails_the_job_and_an_unresumed_one_can_be_cancelled(
    tmp_path: Path,
) -> None:
    async def stop_two() -> list[str]:
        jm = JobManager(FakeFrontend(), tmp_path)
        ids = [(await jm.submit(["hold a", "hold b"], PARAMS)).id for _ in range(2)]
        await asyncio.sleep(0.02)
        await jm.close(drain_s=0)
        return ids

    broken, other = asyncio.run(stop_two())
    (tmp_path / broken / "prompts.jsonl").write_text('"only one"\n')

    async def restart() -> tuple[JobInfo, JobInfo]:
        jm = JobManager(FakeFrontend(), tmp_path)
        cancelled = await jm.cancel(other)  # before resume(): it never runs again
        assert jm.resume() == []
        return jm.status(broken), cancelled

    failed, cancelled = asyncio.run(restart())
    assert failed.state == "failed" and "cannot resume" in (failed.error or "")
    assert "1 prompts on disk" in (failed.error or "")
    assert cancelled.state == "cancelled" and cancelled.finished is not None
    assert [r["error"] for r in lines(tmp_path / other / "results.jsonl")] == [CANCELLED] * 2


def test_one_manager_per_directory(tmp_path: Path) -> None:
    async def main() -> None:
        jm = JobManager(FakeFrontend(), tmp_path)
        with pytest.raises(RuntimeError, match="in use by another pdserve server"):
            JobManager(FakeFrontend(), tmp_path)
        await jm.close()
        other = JobManager(FakeFrontend(), tmp_path)  # released by close()
        assert (await run_to_end(other, ["a"])).state == "completed"
        await other.close()

    asyncio.run(main())
