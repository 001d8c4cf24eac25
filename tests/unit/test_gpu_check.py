"""`make gpu-check` on a CPU: it refuses at once without CUDA, and its step machinery records a
step that passes, fails or hangs, keeps going, and rewrites the report after every step.
The steps here are small Python commands standing in for the GPU ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from pdserve.bench import gpu_check
from pdserve.bench.gpu_check_parity import first_difference
from pdserve.bench.gpu_check_report import JSON_NAME, MARKDOWN_NAME
from pdserve.bench.gpu_check_runner import RESULT, Check, Step
from pdserve.bench.micro.kv_bench import Shape, Wire, run
from pdserve.kv_transfer.link import RECEIVER, SENDER

HEAVY = ("transformers", "ray", "pdserve.engine", "pdserve.cluster", "pdserve.bench.serve")


def _no_gpu_env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine


def test_without_cuda_it_says_what_to_do_in_one_line_and_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "pdserve.bench.gpu_check", "--out", str(out)],
        env=_no_gpu_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPU machine" in lines[0]
    if torch.version.cuda is None:  # this CPU build: the fix is a CUDA build in .venv
        assert "CUDA build of torch into .venv" in lines[0]
    assert not out.exists()  # nothing ran, nothing was written


def test_the_refusal_comes_before_any_slow_import() -> None:
    script = textwrap.dedent(f"""
        import sys
        from pdserve.bench import gpu_check
        code = gpu_check.main(["--out", "unused"])
        print(",".join(m for m in {HEAVY!r} if m in sys.modules))
        sys.exit(code)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], env=_no_gpu_env(), capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stdout.strip() == ""  # none of the heavy modules was imported


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", textwrap.dedent(code))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _report_has(n: int) -> str:
    """A step that passes, and writes a result, only if the report already lists n steps."""
    return f"""
        import json, sys
        report = json.load(open({JSON_NAME!r}))
        names = [s["name"] for s in report["steps"]]
        if len(names) != {n}:
            sys.exit(f"the report lists {{names}}")
        json.dump({{"summary": "report had {n}", "markdown": "a section of its own"}},
                  open(sys.argv[1], "w"))
    """


def test_steps_that_pass_fail_or_hang_are_recorded_and_the_rest_still_run(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hang = f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        print("working on it", flush=True)
        time.sleep(120)
    """
    steps = [
        Step("hang", "a step that hangs", _py(hang), 1.5),
        Step("after-hang", "the report has the hung step", (*_py(_report_has(1)), RESULT), 20),
        Step("fail", "a step that fails", _py("print('boom'); raise SystemExit(3)"), 20),
        Step("after-fail", "the report has three", (*_py(_report_has(3)), RESULT), 20),
    ]
    lines: list[str] = []
    check = Check(
        tmp_path, 61.5, {"gpu": "none"}, tmp_path, reserve_s=0, echo=lines.append, min_step_s=1
    )
    results = check.run(steps)

    assert [r.status for r in results] == ["timed out", "passed", "failed", "passed"]
    hung, after, failed, last = results
    assert hung.returncode is None and hung.summary.endswith("so far: working on it")
    assert not any(_alive(int(pid)) for pid in pids.read_text().split())  # its group is gone
    assert after.summary == "report had 1" and last.summary == "report had 3"
    assert failed.returncode == 3 and failed.summary == "boom" and failed.log is not None
    assert (tmp_path / failed.log).read_text().strip() == "boom"
    assert len([ln for ln in lines if ln.split()[0] in ("TIMED", "PASSED", "FAILED")]) == 4

    report = json.loads((tmp_path / JSON_NAME).read_text())
    assert [s["status"] for s in report["steps"]] == [r.status for r in results]
    assert report["passed"] is False and report["machine"] == {"gpu": "none"}
    md = (tmp_path / MARKDOWN_NAME).read_text()
    for r in results:
        assert f"| {r.name} | {r.status} |" in md
    assert "## after-hang: the report has the hung step\n\na section of its own" in md


def test_skipped_steps_and_a_spent_budget_run_nothing(tmp_path: Path) -> None:
    steps = [
        Step("skipped", "skipped", _py("raise SystemExit(1)"), 1),
        Step("late", "no time left", _py("raise SystemExit(1)"), 1),
    ]
    check = Check(tmp_path, 3, {}, tmp_path, reserve_s=0, echo=lambda _: None, min_step_s=5)
    results = check.run(steps, skip=["skipped"])
    assert [(r.status, r.ok) for r in results] == [("skipped", True), ("not run", False)]
    assert [r.log for r in results] == [None, None]


def test_an_interrupted_check_records_where_it_stopped_and_reraises(tmp_path: Path) -> None:
    def echo(line: str) -> None:
        if line.startswith("[2/"):
            raise KeyboardInterrupt

    steps = [Step(n, n, _py("pass"), 20) for n in ("one", "two", "three")]
    with pytest.raises(KeyboardInterrupt):
        Check(tmp_path, 60, {}, tmp_path, reserve_s=0, echo=echo).run(steps)
    report = json.loads((tmp_path / JSON_NAME).read_text())
    assert [s["status"] for s in report["steps"]] == ["passed", "interrupted", "not run"]


def test_the_gpu_steps_name_real_modules_and_scale_with_the_budget() -> None:
    steps = gpu_check.build_steps("python", scale=0.5)
    assert [s.name for s in steps] == [n for n, _, _ in gpu_check.STEPS]
    assert sum(s.timeout_s for s in steps) == sum(t for _, _, t in gpu_check.STEPS) / 2
    assert sum(t for _, _, t in gpu_check.STEPS) < gpu_check.DEFAULT_BUDGET_S  # room to stop
    for step in steps:
        module = step.argv[step.argv.index("-m") + 1]
        assert find_spec(module) is not None, module
        assert step.name == "gpu-tests" or RESULT in step.argv


def test_kv_bench_puts_the_receiver_on_a_second_gpu_only_over_nccl() -> None:
    assert Wire("nccl", "cuda").device_of(RECEIVER) == torch.device("cuda:1")
    assert Wire("nccl", "cuda").device_of(SENDER) == torch.device("cuda:0")
    assert Wire("cuda_ipc", "cuda").device_of(RECEIVER) == torch.device("cuda:0")
    assert Wire("host", "cpu").device_of(RECEIVER) == torch.device("cpu")


def test_kv_bench_runs_another_backend_and_names_it() -> None:
    shape = Shape(layers=2, kv_heads=2, head_dim=8)
    results = run(shape, [40], repeats=1, wire=Wire("host", "cpu"))  # raises if KV landed wrong
    assert results[40]["backend"] == "host" and results[40]["pdserve"] > 0


def test_parity_finds_the_first_difference_or_an_answer_ending_first() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_the_parity_step_matches_transformers_on_a_cpu(tmp_path: Path) -> None:
    """The GPU step's own code on the tiny model in float32, where every answer must agree."""
    from pdserve.bench import gpu_check_parity

    result = tmp_path / "parity.json"
    argv = ["--device", "cpu", "--model", "tiny", "--dtypes", "float32", "--max-tokens", "4"]
    assert gpu_check_parity.main([*argv, "--result", str(result)]) == 0
    (row,) = json.loads(result.read_text())["dtypes"]
    assert row["identical"] == row["prompts"] == 20 and row["divergences"] == []
    assert row["matched_tokens"] == row["reference_tokens"] > 0


def test_the_engine_step_times_both_engines_on_a_cpu(tmp_path: Path) -> None:
    from pdserve.bench import gpu_check_engine

    result = tmp_path / "engine.json"
    argv = ["--device", "cpu", "--model", "tiny", "--dtype", "float32", "--batch-sizes", "2"]
    argv += ["--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "0"]
    assert gpu_check_engine.main([*argv, "--result", str(result)]) == 0
    rows = json.loads(result.read_text())["rows"]
    assert [(r["phase"], r["batch"]) for r in rows] == [("decode", 2), ("prefill", 2)]
    assert all(r["pdserve_tok_s"] > 0 and r["baseline_tok_s"] > 0 for r in rows)
