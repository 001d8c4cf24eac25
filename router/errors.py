"""The router's errors: the one a dead worker's port raises, and the one a caller sees when no
live instance can take a request (HTTP 503)."""

from __future__ import annotations

from typing import Literal

Role = Literal["prefill", "decode"]


class WorkerDied(RuntimeError):
    """The worker process behind a port is gone (its actor died); nothing more comes from it.

    ``role`` and ``instance`` name it (for a prefill instance, ``rank`` is the TP rank called,
    though the death may be any rank's: the group cannot run a batch without it).
    """

    def __init__(self, role: Role, instance: int, rank: int | None = None, cause: str = "") -> None:
        who = f"{role} instance {instance}" + ("" if rank is None else f" rank {rank}")
        super().__init__(f"{who} died" + (f": {cause}" if cause else ""))
        self.role: Role = role
        self.instance = instance
        self.rank = rank


class NoCapacityError(RuntimeError):
    """No live instance can ever take this request: a prompt too large for every decode
    replica, or a pool with no live instance left."""
