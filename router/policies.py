"""Dispatch policies: pure functions from load snapshots to the instance a request goes to.

Every policy is deterministic: ties go to the lowest instance id, and round robin walks the
instances in id order starting at `counter`, so the caller owns the only state (the counter).

`cache_aware` also reads the router's estimate of each instance's prefix-cache hit for this
prompt (`router.prefix_index`), and trades it against load:

- decode: the replica with the longest expected hit, unless its hit beats the load-balanced
  pick's (`most_free_blocks`') by less than CACHE_MIN_SHARE of the prompt's blocks, or its
  running + waiting sequences exceed that pick's by more than BALANCE_ABS and by more than
  BALANCE_REL times (SGLang's cache-aware rule): then the load-balanced pick. Without hits it
  picks exactly as `most_free_blocks`.
- prefill: the least expected work before this prompt's first token: queued prompt tokens plus
  the prompt's tokens not cached there. Without hits it picks exactly as `least_loaded`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pdserve.engine.load import DecodeLoad, PrefillLoad

PREFILL_POLICIES: tuple[str, ...] = ("round_robin", "least_loaded", "cache_aware")
DECODE_POLICIES: tuple[str, ...] = (
    "round_robin",
    "most_free_blocks",
    "fewest_running",
    "cache_aware",
)
# a hit pulls a request away from the load-balanced replica only when it covers this much more
# of the prompt there (SGLang's cache_threshold, 0.5, as a share of the prompt's blocks)
CACHE_MIN_SHARE = 0.5
BALANCE_ABS = 4  # sequences: ... unless the cached replica runs this many more
BALANCE_REL = 1.5  # ... and this many times as many (both, as SGLang's balance thresholds)


def pick_prefill(
    policy: str,
    loads: Sequence[PrefillLoad],
    counter: int,
    cached_tokens: Mapping[int, int] | None = None,
) -> int:
    """Instance id for the next prompt.

    round_robin: the `counter`-th instance in id order. least_loaded: fewest queued prompt tokens
    (the best predictor of queueing delay, hence TTFT), then fewest queued requests.
    cache_aware: fewest queued tokens less the prompt's tokens expected cached there
    (`cached_tokens`, by instance), then as least_loaded.
    """
    _check_policy(policy, PREFILL_POLICIES, "prefill")
    if not loads:
        raise ValueError("no prefill instances to pick from: the prefill pool is empty")
    if policy == "round_robin":
        return _round_robin([load.instance for load in loads], counter)
    hits = cached_tokens if policy == "cache_aware" and cached_tokens else {}
    best = min(
        loads,
        key=lambda x: (
            x.queued_tokens - hits.get(x.instance, 0),
            x.queued_requests,
            x.instance,
        ),
    )
    return best.instance


def pick_decode(
    policy: str,
    loads: Sequence[DecodeLoad],
    blocks_needed: int,
    counter: int,
    hits: Mapping[int, int] | None = None,
) -> int | None:
    """Instance id for a request whose prompt needs `blocks_needed` KV blocks, or None when no
    replica has that many free blocks (the request waits or is rejected).

    round_robin: the first eligible replica in id order at or after the `counter`-th one.
    most_free_blocks: most free blocks. fewest_running: fewest running seqs, then fewest waiting.
    cache_aware: the rule of the module docstring over `hits` (leading prompt blocks expected
    cached, by instance).
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
        return _most_free(eligible).instance
    if policy == "cache_aware":
        return _cache_aware(eligible, blocks_needed, hits or {}).instance
    return min(eligible, key=lambda x: (x.running, x.waiting, x.instance)).instance


def _most_free(loads: Sequence[DecodeLoad]) -> DecodeLoad:
    return min(loads, key=lambda x: (-x.free_blocks, x.instance))


def _cache_aware(
    eligible: Sequence[DecodeLoad], blocks_needed: int, hits: Mapping[int, int]
) -> DecodeLoad:
    balanced = _most_free(eligible)
    cached = min(eligible, key=lambda x: (-hits.get(x.instance, 0), -x.free_blocks, x.instance))
    gain = hits.get(cached.instance, 0) - hits.get(balanced.instance, 0)
    if gain <= 0 or gain < CACHE_MIN_SHARE * blocks_needed:
        return balanced
    load, least = cached.running + cached.waiting, balanced.running + balanced.waiting
    if load - least > BALANCE_ABS and load > BALANCE_REL * least:
        return balanced
    return cached


def _round_robin(instances: Sequence[int], counter: int) -> int:
    ordered = sorted(instances)
    return ordered[counter % len(ordered)]


def _check_policy(policy: str, valid: tuple[str, ...], role: str) -> None:
    if policy not in valid:
        raise ValueError(f"unknown {role} policy {policy!r}: choose one of {', '.join(valid)}")
