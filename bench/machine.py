"""The machine a benchmark ran on: CPU model, core count, library versions, threads, date.

Recorded beside every figure (`micro.engine_bench`, `profile.runner`) so a number is never
read without the host that produced it.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformers


def machine_facts(threads: int) -> dict[str, Any]:
    """This host's facts, as JSON-ready values; `threads` is the torch thread count used."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
