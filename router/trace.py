"""``RequestTrace``: one request's phase timings and transfer sizes, filled as it moves."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestTrace:
    """Phase timestamps (time.perf_counter) for the metrics; filled as the request moves."""

    prefill_queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_wait_s: float = 0.0  # of prefill_s: waiting for the KV sends after the forward
    kv_bytes: int = 0
    kv_reused_bytes: int = 0  # the prompt's KV the decode replica held already (not sent)
    decode_cached_tokens: int = 0  # the prompt's tokens found in the decode replica's cache
    prefill_cached_tokens: int = 0  # of the prompt's tokens, those its prefill did not compute
    transfer_s: float = 0.0
    decode_instance: int = -1
    prefill_instance: int = -1
    migrations: int = 0  # moves to another decode replica after its replica died (token replay)
    prefill_retries: int = 0  # prefills retried on another instance after an instance died
