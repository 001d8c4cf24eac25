"""Joining Ray: the one place pdserve calls ``ray.init``.

``init_ray`` connects to a running cluster at an address, or starts a local instance (no
dashboard, a chosen number of logical CPU slots); driver logs stay off either way, since
workers report through their own loggers. ``ensure_ray`` does the same unless Ray is up
already, and says whether the caller started it (and so should shut it down).
"""

from __future__ import annotations

import os

import ray


def init_ray(
    address: str | None = None, *, namespace: str | None = None, num_cpus: int | None = None
) -> None:
    """Connect to the Ray cluster at `address` ('auto': the running one), or with None start a
    local instance with `num_cpus` logical CPU slots (None: Ray counts the cores)."""
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus, namespace=namespace, include_dashboard=False, log_to_driver=False
        )


def ensure_ray(address: str | None, num_cpus_needed: int, namespace: str) -> bool:
    """Connect to Ray, or start a local instance; True when this call started it."""
    if ray.is_initialized():
        return False
    if address:
        init_ray(address, namespace=namespace)
        return False
    # Logical CPU slots: each CPU worker pins its own torch threads, so slots may exceed cores.
    init_ray(namespace=namespace, num_cpus=max(num_cpus_needed, os.cpu_count() or 1))
    return True
