"""Prometheus metrics of one serving app, named as vLLM names them (prefix ``pdserve:``).

Each ServingMetrics owns its CollectorRegistry, so two apps in one process never collide. Request
histograms and counters are observed once per finished request from its RequestMetrics; the load
gauges are set by whoever polls the workers (the controller, every second or so).

Prefix caching, in tokens as vLLM counts it, over finished requests: ``prefix_cache_queries`` /
``prefix_cache_hits`` labelled ``pool`` (decode: the prompt's tokens looked up at reservation and
those found; prefill: the prompts the prefill pool ran and the tokens it did not compute, none
until it caches),
``prompt_tokens_by_source`` (``local_compute`` or ``local_cache_hit``: where each prompt's prefill
took its KV from) and ``prompt_tokens_cached``; ``kv_reused_bytes`` beside ``kv_transfer_bytes``:
prompt KV a decode replica held already and so was not sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdserve.engine.request import RequestMetrics

__all__ = ["CONTENT_TYPE", "ServingMetrics"]

PREFIX = "pdserve:"
# vLLM's buckets, so dashboards built for vLLM read these unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# Queue, prefill and transfer phases are often sub-millisecond to a few seconds.
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0, 60.0, 120.0)  # fmt: skip


FAILURE_REASONS = ("failed", "unavailable", "internal", "queue_full")
POOLS = ("prefill", "decode")


class ServingMetrics:
    """Request latencies, token and byte counters and load gauges, labelled with model_name.

    ``inter_token_latency_seconds`` is observed once per request with its TPOT
    ((E2E - TTFT) / (output tokens - 1)), for requests of two or more output tokens.
    """

    def __init__(self, model_name: str, prefill_pool: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.prefill_pool = prefill_pool  # disaggregated: a prefill pool prefills the prompts
        self._ttft = self._histogram("time_to_first_token_seconds", "First token.", TTFT_BUCKETS)
        self._itl = self._histogram(
            "inter_token_latency_seconds",
            "Mean time between output tokens, per request.",
            ITL_BUCKETS,
        )
        self._e2e = self._histogram(
            "e2e_request_latency_seconds", "Arrival to last token.", REQUEST_BUCKETS
        )
        self._queue = self._histogram(
            "request_queue_time_seconds", "Waiting before prefill compute.", PHASE_BUCKETS
        )
        self._prefill = self._histogram(
            "request_prefill_time_seconds", "Prefill compute incl. sending the KV.", PHASE_BUCKETS
        )
        self._transfer = self._histogram(
            "kv_transfer_time_seconds", "KV transfer prefill -> decode.", PHASE_BUCKETS
        )
        self._kv_bytes = self._counter("kv_transfer_bytes", "KV bytes received by decode.")
        self._prompt_tokens = self._counter("prompt_tokens", "Prompt tokens of finished requests.")
        self._generation_tokens = self._counter("generation_tokens", "Generated tokens.")
        self._success = Counter(
            PREFIX + "request_success",
            "Finished requests by reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._failure = Counter(
            PREFIX + "request_failure",
            "Requests that ended in an error (failed, unavailable, internal) or were refused for "
            "a full queue (queue_full).",
            ["model_name", "reason"],
            registry=self.registry,
        )
        for reason in FAILURE_REASONS:  # present (at 0) before the first failure
            self._failure.labels(model_name=model_name, reason=reason)
        self._kv_usage = self._gauge("kv_cache_usage_perc", "Decode KV blocks in use, 0 to 1.")
        self._running = self._gauge("num_requests_running", "Sequences decoding.")
        self._waiting = self._gauge("num_requests_waiting", "Sequences waiting on decode.")
        self._prefill_queued = self._gauge("num_prefill_queued", "Requests queued for prefill.")
        self._kv_reused = self._counter(
            "kv_reused_bytes", "Prompt KV bytes decode held already in its prefix cache (not sent)."
        )
        self._prompt_cached = self._counter(
            "prompt_tokens_cached", "Prompt tokens whose prefill KV came from a prefix cache."
        )
        self._by_source = self._labelled(
            "prompt_tokens_by_source", "Prompt tokens by where their KV came from.", "source"
        )
        self._queries = self._labelled(
            "prefix_cache_queries", "Prompt tokens looked up in a prefix cache.", "pool"
        )
        self._hits = self._labelled(
            "prefix_cache_hits", "Of those, tokens found in the cache.", "pool"
        )
        self._deaths = self._labelled("worker_deaths", "Instances found dead, by pool.", "pool")
        self._restarts = self._labelled(
            "worker_restarts", "Dead instances replaced by a fresh one, by pool.", "pool"
        )
        for pool in POOLS:  # present (at 0) before the first death
            self._deaths.labels(model_name=model_name, pool=pool)
            self._restarts.labels(model_name=model_name, pool=pool)
        self._migrations = self._counter(
            "request_migrations", "Requests moved to another decode replica after a death."
        )
        self._prefill_retries = self._counter(
            "prefill_retries", "Prefills retried on another instance after a death."
        )
        # speculative decoding per decode replica (vLLM's spec_decode_* names)
        self._spec = {
            key: self._labelled(name, doc, "replica")
            for key, name, doc in (
                ("spec_proposed", "spec_decode_num_draft_tokens", "Draft tokens proposed."),
                ("spec_accepted", "spec_decode_num_accepted_tokens", "Draft tokens accepted."),
                (
                    "spec_emitted",
                    "spec_decode_num_emitted_tokens",
                    "Tokens verified steps emitted.",
                ),
                ("spec_verified", "spec_decode_num_drafts", "Verified (sequence, step) pairs."),
            )
        }
        self._spec_rate = self._replica_gauge(
            "spec_decode_acceptance_rate", "Accepted / proposed draft tokens, since start."
        )
        self._spec_length = self._replica_gauge(
            "spec_decode_mean_accepted_length", "Tokens per verified step (1 to k + 1)."
        )
        self._kv_backend_bytes = Counter(
            PREFIX + "kv_transfer_backend_bytes",
            "KV bytes received by decode, by replica and link backend (nccl, cuda_ipc, host, gloo).",
            ["model_name", "replica", "backend"],
            registry=self.registry,
        )
        # called before each render (the controller syncs the recovery counters there)
        self.before_render: Callable[[], None] | None = None
        self._synced: dict[str, float] = {}  # running totals the counters were raised to

    def observe_request(
        self, m: RequestMetrics, finish_reason: str | None, prompt_tokens: int
    ) -> None:
        """Record one finished request."""
        self._ttft.observe(m.ttft)
        if m.num_output_tokens > 1:
            self._itl.observe(m.tpot)
        self._e2e.observe(m.e2e)
        self._queue.observe(m.queue_s)
        self._prefill.observe(m.prefill_s)
        if m.kv_bytes > 0:  # a request whose KV never moved has no transfer to time
            self._transfer.observe(m.transfer_s)
            self._kv_bytes.inc(m.kv_bytes)
        self._prompt_tokens.inc(prompt_tokens)
        self._generation_tokens.inc(m.num_output_tokens)
        self._observe_reuse(m, prompt_tokens)
        reason = finish_reason or "abort"
        self._success.labels(model_name=self.model_name, finished_reason=reason).inc()

    def observe_failure(self, reason: str) -> None:
        """Count one request that failed (``reason`` one of FAILURE_REASONS)."""
        self._failure.labels(model_name=self.model_name, reason=reason).inc()

    def set_load(self, kv_usage: float, running: int, waiting: int, queued_prefill: int) -> None:
        """The cluster's current load, summed over replicas (kv_usage in [0, 1])."""
        self._kv_usage.set(kv_usage)
        self._running.set(running)
        self._waiting.set(waiting)
        self._prefill_queued.set(queued_prefill)

    def set_recovery(
        self,
        deaths: Mapping[str, int],
        restarts: Mapping[str, int],
        migrations: int,
        prefill_retries: int,
    ) -> None:
        """Bring the recovery counters up to these running totals (by pool where labelled)."""
        for name, family, totals in (
            ("deaths", self._deaths, deaths),
            ("restarts", self._restarts, restarts),
        ):
            for pool, total in totals.items():
                child = family.labels(model_name=self.model_name, pool=pool)
                self._raise_to(f"{name}/{pool}", child, total)
        self._raise_to("migrations", self._migrations, migrations)
        self._raise_to("prefill_retries", self._prefill_retries, prefill_retries)

    def set_speculation(self, counters: Mapping[int, Mapping[str, float]]) -> None:
        """Each speculating decode replica's running totals (SpecCounters.as_dict)."""
        for replica, c in counters.items():
            labels = {"model_name": self.model_name, "replica": str(replica)}
            for key, family in self._spec.items():
                self._raise_to(f"{key}/{replica}", family.labels(**labels), c[key])
            self._spec_rate.labels(**labels).set(c["spec_acceptance_rate"])
            self._spec_length.labels(**labels).set(c["spec_mean_accepted_length"])

    def set_kv_backends(self, received: Mapping[int, Mapping[str, int]]) -> None:
        """Each decode replica's KV bytes received since start, by link backend."""
        for replica, by_backend in received.items():
            for backend, total in by_backend.items():
                child = self._kv_backend_bytes.labels(
                    model_name=self.model_name, replica=str(replica), backend=backend
                )
                self._raise_to(f"kv/{replica}/{backend}", child, total)

    def _raise_to(self, key: str, counter: Counter, total: float) -> None:
        """Keep a counter equal to a running total counted elsewhere (it never goes down)."""
        gap = total - self._synced.get(key, 0)
        if gap > 0:
            counter.inc(gap)
            self._synced[key] = total

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (Content-Type: ``CONTENT_TYPE``)."""
        if self.before_render is not None:
            self.before_render()
        return generate_latest(self.registry)

    def _observe_reuse(self, m: RequestMetrics, prompt_tokens: int) -> None:
        cached = min(m.cached_tokens, prompt_tokens)
        name = self.model_name
        self._by_source.labels(model_name=name, source="local_compute").inc(prompt_tokens - cached)
        self._by_source.labels(model_name=name, source="local_cache_hit").inc(cached)
        self._prompt_cached.inc(cached)
        self._kv_reused.inc(m.kv_reused_bytes)
        self._queries.labels(model_name=name, pool="decode").inc(prompt_tokens)
        self._hits.labels(model_name=name, pool="decode").inc(
            min(m.decode_cached_tokens, prompt_tokens)
        )
        if self.prefill_pool:
            self._queries.labels(model_name=name, pool="prefill").inc(prompt_tokens)
            self._hits.labels(model_name=name, pool="prefill").inc(cached)

    # -- construction: each metric has one child, bound to this app's model_name -----------------

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        h = Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets, registry=self.registry)
        return h.labels(model_name=self.model_name)

    def _counter(self, name: str, doc: str) -> Counter:
        # prometheus_client appends "_total" to counter names.
        c = Counter(PREFIX + name, doc, ["model_name"], registry=self.registry)
        return c.labels(model_name=self.model_name)

    def _labelled(self, name: str, doc: str, label: str) -> Counter:
        return Counter(PREFIX + name, doc, ["model_name", label], registry=self.registry)

    def _replica_gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(PREFIX + name, doc, ["model_name", "replica"], registry=self.registry)

    def _gauge(self, name: str, doc: str) -> Gauge:
        g = Gauge(PREFIX + name, doc, ["model_name"], registry=self.registry)
        return g.labels(model_name=self.model_name)
