"""The report of ``make gpu-check``: ``gpu_check.json`` (every figure) and ``gpu_check.md`` (a
summary to paste into an issue or docs/performance.md), both rewritten after every step.

Each file is written to a temporary name and renamed, so a check killed mid-write leaves the
previous complete report rather than half of a new one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.bench.gpu_check_runner import StepResult

JSON_NAME = "gpu_check.json"
MARKDOWN_NAME = "gpu_check.md"


def write_report(
    out_dir: Path,
    machine: Mapping[str, Any],
    budget_s: float,
    elapsed_s: float,
    results: Sequence[StepResult],
) -> None:
    """Both files, from the results so far (``finished`` once no step is left to run)."""
    report = {
        "check": "pdserve gpu-check",
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": dict(machine),
        "budget_s": budget_s,
        "elapsed_s": round(elapsed_s, 1),
        "passed": bool(results) and all(r.ok for r in results),
        "steps": [asdict(r) for r in results],
    }
    _write(out_dir / JSON_NAME, json.dumps(report, indent=2, default=str))
    _write(out_dir / MARKDOWN_NAME, markdown(report, results))


def markdown(report: Mapping[str, Any], results: Sequence[StepResult]) -> str:
    """The summary: the machine, one table row per step, then each step's own section."""
    m = report["machine"]
    facts = [
        f"{m.get('gpu', '?')} x{m.get('gpu_count', '?')}",
        f"torch {m.get('torch', '?')} (CUDA {m.get('cuda', '?')})",
        f"transformers {m.get('transformers', '?')}",
        f"commit {m.get('commit', '?')}",
        str(report["written"]),
    ]
    ok = sum(r.ok for r in results)
    lines = [
        "# pdserve gpu-check",
        "",
        " · ".join(facts),
        "",
        f"{ok}/{len(results)} steps passed or skipped, {report['elapsed_s']:.0f} s of a "
        f"{report['budget_s']:g} s budget.",
        "",
        "| step | status | seconds | timeout | result |",
        "|---|---|---:|---:|---|",
    ]
    for r in results:
        cells = (r.name, r.status, f"{r.seconds:.1f}", f"{r.timeout_s:.0f}", _cell(r.summary))
        lines.append("| " + " | ".join(cells) + " |")
    for r in results:
        section = r.data.get("markdown")
        if section:
            lines += ["", f"## {r.name}: {r.title}", "", str(section).rstrip()]
    lines += ["", "Each step's output is in `logs/<step>.log`, its figures in `gpu_check.json`."]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
