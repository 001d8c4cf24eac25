"""Joining Ray: the one place pdserve calls ``ray.init``.

``init_ray`` connects to a running cluster at an address, or starts a local instance (no
dashboard, a chosen number of logical CPU slots); driver logs stay off either way, since
workers report through their own loggers. ``ensure_ray`` does the same unless Ray is up
already, and says whether the caller started it (and so should shut it down).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import ray

PROBE_TIMEOUT_S = 5.0


class RayAddressError(RuntimeError):
    """No Ray cluster answers at the address given; the message says what to do."""


def init_ray(
    address: str | None = None, *, namespace: str | None = None, num_cpus: int | None = None
) -> None:
    """Connect to the Ray cluster at `address` ('auto': the running one), or with None start a
    local instance with `num_cpus` logical CPU slots (None: Ray counts the cores)."""
    if address:
        check_ray_address(address)
        use_token_if_available()
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


def check_ray_address(address: str) -> None:
    """RayAddressError unless a Ray cluster's GCS accepts a TCP connection at ``address``
    ('auto': the cluster `ray start` last recorded), within PROBE_TIMEOUT_S: ray.init would
    retry a dead address for minutes. ``ray://`` client addresses are left to Ray."""
    if address.startswith("ray://"):
        return
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address)
    except Exception as e:  # Ray's own errors: no cluster recorded, a malformed address...
        raise RayAddressError(
            f"no Ray cluster found for address {address!r} ({e}): start one with "
            "`ray start --head`, or pass the address `ray start` printed"
        ) from None
    if resolved is None:
        raise RayAddressError(f"no running Ray cluster for address {address!r}")
    host, _, port = resolved.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        raise RayAddressError(
            f"no Ray cluster answers at {resolved} ({e}): is it running (`ray status "
            f"--address {resolved}`)? Start one with `ray start --head`, or fix the address"
        ) from None


def use_token_if_available() -> None:
    """Speak Ray's token auth whenever a token is at hand, whatever RAY_AUTH_MODE says: a
    cluster started with tokens (Ray's default for a new local one) refuses a client without,
    and one without auth accepts a client that sends one."""
    if needs_token_mode():
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")  # Ray caches the mode: refresh it, as Ray does when it enables it


def needs_token_mode() -> bool:
    """A token is available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and
    RAY_AUTH_MODE is not token already."""
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    default = Path.home() / ".ray" / "auth_token"
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN")) or (
        Path(token_path).is_file() if token_path else default.is_file()
    )
    return has_token and os.environ.get("RAY_AUTH_MODE", "").lower() != "token"
