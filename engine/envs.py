"""The one module that reads environment variables; everything else asks it."""

from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
    """Where pdserve keeps built artefacts (tiny models): $PDSERVE_CACHE_DIR or ~/.cache/pdserve."""
    value = os.environ.get("PDSERVE_CACHE_DIR")
    if value:
        return pathlib.Path(value).expanduser()
    return pathlib.Path.home() / ".cache" / "pdserve"


def api_key() -> str | None:
    """The API key clients send to a pdserve server: $PDSERVE_API_KEY, or None when unset."""
    return os.environ.get("PDSERVE_API_KEY") or None
