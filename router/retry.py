"""Which failures the router retries, how often, and the error a request sees past the limit.

Three kinds, each with its own budget per request:

- ``link``: its KV link failed before it yielded anything (the replica died mid-transfer, or a
  link broke): retried from the start, ``KV_LINK_ATTEMPTS`` tries in all.
- ``prefill``: its prefill instance died (any rank of the TP group): retried on another live
  instance with a fresh decode reservation, ``router.max_prefill_retries`` times.
- ``decode``: its decode replica died after the request was placed there (mid-stream
  included): migrated by token replay (the prompt plus every token streamed so far is
  prefilled again, its KV sent to a live replica, and the stream goes on from the next token),
  ``router.max_migrations`` times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pdserve.engine.deploy_config import RouterSettings
from pdserve.router.errors import WorkerDied

Kind = Literal["link", "prefill", "decode"]

KV_LINK_ATTEMPTS = 3  # tries of a request whose KV link failed before it yielded anything


class Retry(Exception):
    """Internal: an attempt failed in a way another placement may fix; ``generate`` retries."""

    def __init__(self, kind: Kind, error: Exception) -> None:
        super().__init__(str(error))
        self.kind: Kind = kind
        self.error = error


@dataclass
class RetryBudget:
    """One request's retries so far, by kind, against the deployment's limits."""

    limits: RouterSettings
    used: dict[Kind, int] = field(default_factory=lambda: {"link": 0, "prefill": 0, "decode": 0})

    def limit(self, kind: Kind) -> int:
        if kind == "link":
            return KV_LINK_ATTEMPTS - 1
        return self.limits.max_migrations if kind == "decode" else self.limits.max_prefill_retries

    def spend(self, retry: Retry, request_id: str) -> None:
        """Count one retry of ``retry.kind``; raise the request's final error past the limit."""
        n = self.used[retry.kind]
        if n >= self.limit(retry.kind):
            raise exhausted(retry, request_id, n) from None
        self.used[retry.kind] = n + 1


def exhausted(retry: Retry, request_id: str, n: int) -> Exception:
    """The error of a request that may be retried no more: the death, naming the knob."""
    e = retry.error
    if retry.kind == "link" or not isinstance(e, WorkerDied):
        return e
    knob, did = (
        ("max_migrations", "migrated")
        if retry.kind == "decode"
        else ("max_prefill_retries", "retried")
    )
    cause = (
        f"request {request_id} was {did} {n} times already, the limit (router.{knob}, "
        f"LLM {knob}=): raise it to retry more"
    )
    return WorkerDied(e.role, e.instance, e.rank, cause)
