"""pdserve's user-facing surface: the offline LLM API (and, later, the client library)."""

from pdserve.cluster.llm import LLM
from pdserve.engine.request import RequestOutput
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams

__all__ = ["LLM", "InvalidRequestError", "RequestOutput", "SamplingParams"]
