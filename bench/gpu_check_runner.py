"""The machinery of ``make gpu-check``: steps run one after another, each in a process of its
own under a timeout carved from one overall budget, and the report is rewritten after each.

Timeouts: a step may run for its own share (``Step.timeout_s``) plus whatever the steps before it
left unused, never into the shares of the steps after it; so the check ends within its budget
and a late step is not starved by an early one that hung.

Why a process per step: a step that hangs (a CUDA call that never returns, a Ray actor that is
never scheduled) or kills its interpreter must not take the rest of the check with it. A step
past its timeout loses its whole process group (it runs in a session of its own) and the next
step runs. Why rewrite the report after every step: a run cut short (the machine handed back,
Ctrl-C) still leaves each finished step's result on disk, and each one was printed as it ended.

A step may write a JSON object to the path given in place of ``RESULT`` in its command (and
rewrite it as it goes, so a step cut short keeps its figures so far): its ``summary`` becomes
the step's one-line result and its ``markdown`` a section of the report. Without one, the last
line the step printed is its summary (pytest's tally, a traceback's error). This module imports no torch: the check's front door stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.gpu_check_report import write_report

RESULT = "{result}"  # in a step's command: the path its JSON result may be written to
MIN_STEP_S = 5.0  # a step given less than this is not started: the budget is spent
KILL_GRACE_S = 5.0  # SIGTERM to a step's process group, then SIGKILL after this


@dataclass(frozen=True)
class Step:
    """One step: a command run from the repository root, and its share of the budget."""

    name: str
    title: str
    argv: tuple[str, ...]
    timeout_s: float


@dataclass
class StepResult:
    """How a step ended. ``status``: passed, failed, timed out, skipped (--skip), not run (the
    budget was spent) or interrupted (the check itself was stopped during it)."""

    name: str
    title: str
    status: str
    timeout_s: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None
    summary: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # the step's JSON result, if it wrote one
    log: str | None = None  # the step's output, relative to the report's folder

    @property
    def ok(self) -> bool:
        return self.status in ("passed", "skipped")


class Check:
    """Runs steps in order within ``budget_s`` seconds, writing ``gpu_check.json`` and
    ``gpu_check.md`` into ``out_dir`` after each. ``reserve_s`` of the budget is kept back for
    killing a last step that overruns and writing the report; ``started`` (``time.monotonic``)
    is when the budget began, if before now."""

    def __init__(
        self,
        out_dir: Path,
        budget_s: float,
        machine: Mapping[str, Any],
        cwd: Path,
        reserve_s: float = 10.0,
        echo: Callable[[str], None] = lambda line: print(line, flush=True),  # piped: at once
        started: float | None = None,
        min_step_s: float = MIN_STEP_S,
    ) -> None:
        self.out_dir, self.cwd, self.echo = out_dir, cwd, echo
        self.budget_s, self.reserve_s, self.min_step_s = budget_s, reserve_s, min_step_s
        self.machine = dict(machine)
        self.results: list[StepResult] = []
        self._start = time.monotonic() if started is None else started  # the budget's clock

    def run(self, steps: Sequence[Step], skip: Iterable[str] = ()) -> list[StepResult]:
        """Every step in turn; on Ctrl-C (or SIGTERM, see ``terminate_as_interrupt``) the step
        running is killed, it and the rest are recorded, the report written, and it re-raises."""
        skipped = set(skip)
        for folder, pattern in (("logs", "*.log"), ("steps", "*.json")):
            (self.out_dir / folder).mkdir(parents=True, exist_ok=True)
            for old in (self.out_dir / folder).glob(pattern):  # a previous run's, not this one's
                old.unlink()
        self.write()
        for i, step in enumerate(steps):
            later = sum(s.timeout_s for s in steps[i + 1 :] if s.name not in skipped)
            try:
                result = self._one(step, step.name in skipped, f"[{i + 1}/{len(steps)}]", later)
            except KeyboardInterrupt:
                self.results.append(StepResult(step.name, step.title, "interrupted"))
                self.results += [StepResult(s.name, s.title, "not run") for s in steps[i + 1 :]]
                self.write()
                raise
            self.results.append(result)
            self.write()
            self.echo(f"{result.status.upper():>11}  {step.name}: {_clip(result.summary)}")
        return self.results

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def write(self) -> None:
        write_report(self.out_dir, self.machine, self.budget_s, self.elapsed_s, self.results)

    def _one(self, step: Step, skip: bool, counter: str, later_s: float) -> StepResult:
        """Run one step; ``later_s``: the shares promised to the steps after it."""
        if skip:
            return StepResult(step.name, step.title, "skipped", summary="--skip")
        timeout = self.budget_s - self.reserve_s - self.elapsed_s - later_s
        if timeout < self.min_step_s:
            summary = f"the {self.budget_s:g} s budget is spent"
            return StepResult(step.name, step.title, "not run", summary=summary)
        self.echo(f"{counter} {step.title} (at most {timeout:.0f} s) ...")
        result_path = self.out_dir / "steps" / f"{step.name}.json"
        log = self.out_dir / "logs" / f"{step.name}.log"
        result_path.unlink(missing_ok=True)  # a stale result must not pass for this run's
        argv = [a.replace(RESULT, str(result_path)) for a in step.argv]
        start = time.monotonic()
        code = run_process(argv, timeout, log, self.cwd)
        seconds = time.monotonic() - start
        data = _read_json(result_path)  # a step cut short may have written its figures so far
        summary = " ".join(str(data.get("summary") or _last_line(log)).split())  # one line
        if code is None:
            status, summary = "timed out", f"over {timeout:.0f} s; so far: {summary}"
        else:
            status = "passed" if code == 0 else "failed"
        rel = str(log.relative_to(self.out_dir))
        return StepResult(step.name, step.title, status, timeout, seconds, code, summary, data, rel)


def run_process(argv: Sequence[str], timeout_s: float, log: Path, cwd: Path) -> int | None:
    """Run ``argv`` in a session of its own with its output in ``log``: its exit code, or None
    when it ran past ``timeout_s`` (its process group is then killed)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None
        except BaseException:  # Ctrl-C or SIGTERM: the step does not outlive the check
            _kill_group(proc)
            raise


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def terminate_as_interrupt() -> None:
    """SIGTERM (``timeout``, a job scheduler) unwinds like Ctrl-C: steps killed, report kept."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def write_result(path: str | Path, data: Mapping[str, Any]) -> None:
    """A step's JSON result (``summary``, ``markdown`` and its figures), written atomically."""
    target = Path(path)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(data), indent=2, default=str))
    os.replace(tmp, target)


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_line(log: Path, limit: int = 200) -> str:
    """The last non-empty line the step printed (progress bars' carriage returns cut)."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 8192))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.split("\r")[-1].strip() for ln in tail.splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1][:limit] if lines else "(no output)"
