"""Frozen settings of the serving surfaces, resolved from the deploy spec's ``server`` section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"  # loopback unless configured: secure by default
    port: int = 8000
    api_key: str | None = (
        None  # when set, every route but /health needs "Authorization: Bearer KEY"
    )
    served_model_name: str = "pdserve"  # the id /v1/models lists and requests must name
    max_request_bytes: int = 1 << 20  # bodies above this get 413
    max_queued_requests: int = 256  # admitted but not yet finished; above it: 429 + Retry-After
    max_tokens_default: int = 16  # OpenAI's default for /v1/completions when max_tokens is absent
    jobs_dir: str = ""  # where batch-job results are written ("" = no jobs API)
