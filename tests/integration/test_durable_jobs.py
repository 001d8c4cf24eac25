"""Durable batch jobs on a real deployment (tiny llama, 1 prefill + 1 decode on CPU): the
controller process is killed mid-job, a new one starts on the same jobs directory and finishes
the job with exactly one result per prompt, each the same greedy output as a fault-free run."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from cluster_helpers import deploy_spec

from pdserve.cluster import Client
from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.spec import load_spec
from pdserve.cluster.launch.controller import find_controller, launch
from pdserve.engine.deploy_config import DeploymentConfig

pytestmark = pytest.mark.integration

PROMPTS = [f"durable job prompt {i}: the quick brown fox" for i in range(40)]
SAMPLING = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}


def _config(model: Path, jobs_dir: Path) -> DeploymentConfig:
    # 4 sequences decode at a time, so the 40 prompts take several rounds to finish
    spec = deploy_spec("deploy/local.yaml", "itest-jobs", model, decode={"max_num_seqs": 4})
    config = resolve(load_spec(spec), gpus_available=False)
    return dataclasses.replace(
        config, server=dataclasses.replace(config.server, jobs_dir=str(jobs_dir))
    )


def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_job_survives_a_controller_crash(
    ray_session: None, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(tiny_dirs["llama"], tmp_path)
    actor, url = launch(config, detached=False)
    try:
        with Client(url) as client:
            job = client.submit_job(PROMPTS, **SAMPLING)
            _until(lambda: job.status()["completed"] >= 8, 30, "8 results")
        ray.kill(actor, no_restart=True)  # the controller process dies mid-job
        _until(lambda: find_controller(config.namespace) is None, 30, "the old controller")
        on_disk = json.loads((tmp_path / job.id / "job.json").read_text())
        lines = (tmp_path / job.id / "results.jsonl").read_text().splitlines()
        assert on_disk["state"] == "running" and 8 <= len(lines) < len(PROMPTS)
        actor, url = launch(config, detached=False)  # a new server on the same jobs directory
        with Client(url) as client:
            info = client.job(job.id).wait(timeout=60, check=True)
            assert (info["completed"], info["failed"], info["resumed"]) == (40, 0, 1)
            resumed = client.job(job.id).results()
            fresh = client.submit_job(PROMPTS, **SAMPLING)  # the same job without a fault
            fresh.wait(timeout=60, check=True)
            reference = fresh.results()
    finally:
        ray.get(actor.shutdown.remote(), timeout=120)
        ray.kill(actor)
    assert [r["index"] for r in resumed] == list(range(40))
    assert [r["token_ids"] for r in resumed] == [r["token_ids"] for r in reference]
    assert all(len(r["token_ids"]) == 24 and r["error"] is None for r in resumed)
    raw = [json.loads(line) for line in (tmp_path / job.id / "results.jsonl").open()]
    assert sorted(r["index"] for r in raw) == list(range(40))  # each written exactly once
    assert lines == [json.dumps(r, ensure_ascii=False) for r in raw[: len(lines)]]  # kept as is
