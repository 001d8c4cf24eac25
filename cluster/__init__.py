"""pdserve's user-facing surface: the offline ``LLM`` API and the ``Client`` library.

``Client`` is light to import (httpx and msgpack only); ``LLM`` pulls in Ray and torch, so it is
imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pdserve.cluster.client import Client, PdserveError
from pdserve.cluster.client_jobs import Job, JobFailedError
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams

if TYPE_CHECKING:
    from pdserve.cluster.llm import LLM
    from pdserve.engine.request import RequestOutput

__all__ = [
    "LLM",
    "Client",
    "InvalidRequestError",
    "Job",
    "JobFailedError",
    "PdserveError",
    "RequestOutput",
    "SamplingParams",
]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from pdserve.cluster.llm import LLM

        return LLM
    if name == "RequestOutput":
        from pdserve.engine.request import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'pdserve.cluster' has no attribute {name!r}")
