"""Where each deployment's Ray cluster is: `pdserve up` writes the address it printed, and
`status` / `down` read it, so they reach the deployment's own cluster rather than whatever
``--address auto`` would find on a host that runs several.

One small JSON file per deployment name under ``<cache dir>/deployments/`` (``$PDSERVE_CACHE_DIR``
or ``~/.cache/pdserve``), readable by its owner only. The address is a hint, never trusted
further: the command still connects to it and finds the controller by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pdserve.engine import envs

MAX_BYTES = 4096  # a record is a few dozen bytes: a bigger file is not ours


def _path(name: str) -> Path:
    return envs.cache_dir() / "deployments" / f"{name}.json"


def record(name: str, address: str, url: str) -> None:
    """Remember that deployment ``name`` runs on the Ray cluster at ``address``."""
    path = _path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"address": address, "url": url, "pid": os.getpid()}, f)
    tmp.replace(path)


def lookup(name: str) -> str | None:
    """The Ray address recorded for ``name``, or None (never recorded, removed, unreadable)."""
    path = _path(name)
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        value = json.loads(path.read_text()).get("address")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def forget(name: str) -> None:
    """The deployment is down: drop its record."""
    _path(name).unlink(missing_ok=True)
