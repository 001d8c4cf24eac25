"""Dispatch policies: pure functions from load snapshots to the instance a request goes to.

Every policy is deterministic: ties go to the lowest instance id, and round robin walks the
instances in id order starting at `counter`, so the caller owns the only state (the counter).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.engine.load import DecodeLoad, PrefillLoad

PREFILL_POLICIES: tuple[str, ...] = ("round_robin", "least_loaded")
DECODE_POLICIES: tuple[str, ...] = ("round_robin", "most_free_blocks", "fewest_running")


def pick_prefill(policy: str, loads: Sequence[PrefillLoad], counter: int) -> int:
    """Instance id for the next prompt.

    round_robin: the `counter`-th instance in id order. least_loaded: fewest queued prompt tokens
    (the best predictor of queueing delay, hence TTFT), then fewest queued requests.
    """
    _check_policy(policy, PREFILL_POLICIES, "prefill")
    if not loads:
        raise ValueError("no prefill instances to pick from: the prefill pool is empty")
    if policy == "round_robin":
        return _round_robin([load.instance for load in loads], counter)
    best = min(loads, key=lambda x: (x.queued_tokens, x.queued_requests, x.instance))
    return best.instance


def pick_decode(
    policy: str, loads: Sequence[DecodeLoad], blocks_needed: int, counter: int
) -> int | None:
    """Instance id for a request whose prompt needs `blocks_needed` KV blocks, or None when no
    replica has that many free blocks (the request waits or is rejected).

    round_robin: the first eligible replica in id order at or after the `counter`-th one.
    most_free_blocks: most free blocks. fewest_running: fewest running seqs, then fewest waiting.
    """
    _check_policy(policy, DECODE_POLICIES, "decode")
    if blocks_needed < 0:
        raise ValueError(f"blocks_needed={blocks_needed} is invalid: must be >= 0")
    eligible = [load for load in loads if load.free_blocks >= blocks_needed]
    if not eligible:
        return None
    if policy == "round_robin":
        start = _round_robin([load.instance for load in loads], counter)
        ok = sorted(load.instance for load in eligible)
        return next((i for i in ok if i >= start), ok[0])
    if policy == "most_free_blocks":
        return min(eligible, key=lambda x: (-x.free_blocks, x.instance)).instance
    return min(eligible, key=lambda x: (x.running, x.waiting, x.instance)).instance


def _round_robin(instances: Sequence[int], counter: int) -> int:
    ordered = sorted(instances)
    return ordered[counter % len(ordered)]


def _check_policy(policy: str, valid: tuple[str, ...], role: str) -> None:
    if policy not in valid:
        raise ValueError(f"unknown {role} policy {policy!r}: choose one of {', '.join(valid)}")
