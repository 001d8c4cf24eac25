"""ServingMetrics: what a Prometheus scrape shows after requests and load updates."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster.serving.metrics import ServingMetrics
from pdserve.engine.request import RequestMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: ServingMetrics) -> Samples:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def request(num_output: int, kv_bytes: int = 1000) -> RequestMetrics:
    return RequestMetrics(
        arrival_time=0.0, queue_s=0.004, prefill_s=0.03, ttft=0.05, e2e=0.45,
        kv_bytes=kv_bytes, transfer_s=0.002, num_output_tokens=num_output,
    )  # fmt: skip


M = (("model_name", "m"),)


def test_a_finished_request_feeds_every_histogram_and_counter() -> None:
    metrics = ServingMetrics("m")
    metrics.observe_request(request(5), "length", prompt_tokens=12)
    s = scrape(metrics)
    assert s[("pdserve:time_to_first_token_seconds_sum", M)] == pytest.approx(0.05)
    assert s[("pdserve:e2e_request_latency_seconds_sum", M)] == pytest.approx(0.45)
    assert s[("pdserve:inter_token_latency_seconds_sum", M)] == pytest.approx(0.1)  # (0.45-0.05)/4
    assert s[("pdserve:request_queue_time_seconds_sum", M)] == pytest.approx(0.004)
    assert s[("pdserve:request_prefill_time_seconds_sum", M)] == pytest.approx(0.03)
    assert s[("pdserve:kv_transfer_time_seconds_sum", M)] == pytest.approx(0.002)
    assert s[("pdserve:kv_transfer_bytes_total", M)] == 1000
    assert s[("pdserve:prompt_tokens_total", M)] == 12
    assert s[("pdserve:generation_tokens_total", M)] == 5
    assert s[("pdserve:request_success_total", (("finished_reason", "length"), *M))] == 1
    # A TTFT of 50 ms lands in the 0.06 bucket, not the 0.04 one.
    assert s[("pdserve:time_to_first_token_seconds_bucket", (("le", "0.04"), *M))] == 0
    assert s[("pdserve:time_to_first_token_seconds_bucket", (("le", "0.06"), *M))] == 1


def test_single_token_and_local_requests_skip_itl_and_transfer() -> None:
    metrics = ServingMetrics("m")
    metrics.observe_request(request(1, kv_bytes=0), None, prompt_tokens=3)
    s = scrape(metrics)
    assert s[("pdserve:inter_token_latency_seconds_count", M)] == 0
    assert s[("pdserve:kv_transfer_time_seconds_count", M)] == 0
    assert s[("pdserve:e2e_request_latency_seconds_count", M)] == 1
    assert s[("pdserve:request_success_total", (("finished_reason", "abort"), *M))] == 1


def test_load_gauges() -> None:
    metrics = ServingMetrics("m")
    metrics.set_load(kv_usage=0.25, running=7, waiting=2, queued_prefill=3)
    s = scrape(metrics)
    assert s[("pdserve:kv_cache_usage_perc", M)] == 0.25
    assert s[("pdserve:num_requests_running", M)] == 7
    assert s[("pdserve:num_requests_waiting", M)] == 2
    assert s[("pdserve:num_prefill_queued", M)] == 3


def test_two_apps_in_one_process_keep_separate_registries() -> None:
    a, b = ServingMetrics("m"), ServingMetrics("m")  # same names: no "Duplicated timeseries"
    a.observe_request(request(2), "stop", prompt_tokens=4)
    assert scrape(a)[("pdserve:prompt_tokens_total", M)] == 4
    assert scrape(b)[("pdserve:prompt_tokens_total", M)] == 0


def test_prompt_tokens_by_source_and_reused_kv() -> None:
    """Colocated: a prompt's cached tokens were not prefilled; the replica held their KV."""
    metrics = ServingMetrics("m")
    m = request(3, kv_bytes=0)
    m.cached_tokens = m.decode_cached_tokens = 32
    m.kv_reused_bytes = 4096
    metrics.observe_request(m, "length", prompt_tokens=40)
    s = scrape(metrics)
    assert s[("pdserve:prefix_cache_queries_total", (*M, ("pool", "decode")))] == 40
    assert s[("pdserve:prefix_cache_hits_total", (*M, ("pool", "decode")))] == 32
    assert s[("pdserve:prompt_tokens_by_source_total", (*M, ("source", "local_compute")))] == 8
    assert s[("pdserve:prompt_tokens_by_source_total", (*M, ("source", "local_cache_hit")))] == 32
    assert s[("pdserve:prompt_tokens_cached_total", M)] == 32
    assert s[("pdserve:kv_reused_bytes_total", M)] == 4096
    assert ("pdserve:prefix_cache_queries_total", (*M, ("pool", "prefill"))) not in s


def test_disaggregated_each_pool_counts_its_own_hits() -> None:
    """Decode held 16 of the prompt's tokens (not sent); the prefill pool computed them all."""
    metrics = ServingMetrics("m", prefill_pool=True)
    m = request(3)
    m.decode_cached_tokens = 16
    metrics.observe_request(m, "length", prompt_tokens=40)
    s = scrape(metrics)
    assert s[("pdserve:prefix_cache_queries_total", (*M, ("pool", "prefill")))] == 40
    assert s[("pdserve:prefix_cache_hits_total", (*M, ("pool", "prefill")))] == 0
    assert s[("pdserve:prefix_cache_hits_total", (*M, ("pool", "decode")))] == 16
    assert s[("pdserve:prompt_tokens_by_source_total", (*M, ("source", "local_compute")))] == 40


def test_speculation_counters_per_replica_feed_the_bench_summary() -> None:
    from pdserve.bench.serve.server_cache import CacheCounters, format_reuse
    from pdserve.engine.speculative import SpecCounters

    metrics = ServingMetrics("m")
    a, b = SpecCounters(), SpecCounters()
    a.add(4, 5)  # all four drafts accepted, plus the bonus token
    a.add(4, 1)
    b.add(2, 2)
    metrics.set_speculation({0: a.as_dict(), 1: b.as_dict()})
    a.add(4, 3)
    metrics.set_speculation({0: a.as_dict(), 1: b.as_dict()})  # running totals, synced again
    s = scrape(metrics)
    r0 = (*M, ("replica", "0"))
    assert s[("pdserve:spec_decode_num_draft_tokens_total", r0)] == 12
    assert s[("pdserve:spec_decode_num_accepted_tokens_total", r0)] == 6
    assert s[("pdserve:spec_decode_num_drafts_total", r0)] == 3
    assert s[("pdserve:spec_decode_acceptance_rate", r0)] == 0.5
    assert s[("pdserve:spec_decode_mean_accepted_length", r0)] == 3.0
    # the bench's scrape sums the replicas: (6 + 1) of (12 + 2) drafts accepted
    spec = CacheCounters.parse(metrics.render().decode()).to_json()["speculative"]
    assert (spec["proposed"], spec["accepted"], spec["acceptance_rate"]) == (14, 7, 0.5)
    assert "Draft acceptance rate (%):" in format_reuse({"speculative": spec})
