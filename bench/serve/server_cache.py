"""The server's prefix-reuse counters around a benchmark run, from its Prometheus `/metrics`.

pdserve exports, over finished requests (cluster/serving/metrics.py):

- `pdserve:prefix_cache_queries_total` / `pdserve:prefix_cache_hits_total` by `pool`: prompt
  tokens looked up in a prefix cache and found (vLLM exports `vllm:prefix_cache_*`, no pool);
- `pdserve:prompt_tokens_by_source_total` by `source`: prompt tokens the prefill computed
  (`local_compute`) and those whose KV came from a cache (`local_cache_hit`);
- `pdserve:kv_transfer_bytes_total` / `pdserve:kv_reused_bytes_total`: prompt KV bytes sent from
  prefill to decode, and those decode held already (not sent);
- `pdserve:spec_decode_num_draft_tokens_total` / `..._num_accepted_tokens_total` /
  `..._num_emitted_tokens_total` / `..._num_drafts_total` by `replica`: speculative decoding's
  drafts proposed and accepted, the tokens verified steps emitted, and the verified steps
  (vLLM's `vllm:spec_decode_*` too), summed over replicas: the acceptance rate.

The difference of two scrapes covers the requests finished in between. A server without them
(or without `/metrics`) gives nothing, and the result says nothing about it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

PREFIX_COUNTERS = {  # family -> what it counts, per pool
    "pdserve:prefix_cache_queries": "queries",
    "pdserve:prefix_cache_hits": "hits",
    "vllm:prefix_cache_queries": "queries",
    "vllm:prefix_cache_hits": "hits",
}
SOURCES = {"local_compute": "computed", "local_cache_hit": "cached"}
KV_COUNTERS = {"pdserve:kv_transfer_bytes": "sent", "pdserve:kv_reused_bytes": "reused"}
BY_SOURCE = "pdserve:prompt_tokens_by_source"
SPEC_COUNTERS = {  # family -> what it counts, summed over decode replicas
    f"{server}:spec_decode_{name}": key
    for server in ("pdserve", "vllm")
    for name, key in (
        ("num_draft_tokens", "proposed"),
        ("num_accepted_tokens", "accepted"),
        ("num_emitted_tokens", "emitted"),
        ("num_drafts", "verified"),
    )
}


@dataclass(frozen=True)
class CacheCounters:
    """Totals by (section, name): ("pool:<pool>", "queries" | "hits"), ("prefill_tokens",
    "computed" | "cached"), ("kv_bytes", "sent" | "reused"); a pool is "all" where the server
    labels none."""

    totals: Mapping[tuple[str, str], float]

    @classmethod
    def parse(cls, text: str) -> CacheCounters:
        totals: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = _key(family.name, sample.name, sample.labels)
                if key is not None:
                    totals[key] = totals.get(key, 0.0) + sample.value
        return cls(totals)

    def minus(self, before: CacheCounters) -> CacheCounters:
        return CacheCounters({k: v - before.totals.get(k, 0.0) for k, v in self.totals.items()})

    def to_json(self) -> dict[str, Any]:
        """{"prefix_cache": {pool: {queries, hits, hit_rate}}, "prefill_tokens": {computed,
        cached}, "kv_bytes": {sent, reused}}: the sections the server exported."""
        out: dict[str, Any] = {}
        pools = sorted({s.removeprefix("pool:") for s, _ in self.totals if s.startswith("pool:")})
        if pools:
            out["prefix_cache"] = {pool: self._pool(pool) for pool in pools}
        for section, names in (
            ("prefill_tokens", SOURCES.values()),
            ("kv_bytes", ("sent", "reused")),
            ("speculative", ("proposed", "accepted", "emitted", "verified")),
        ):
            if any(s == section for s, _ in self.totals):
                out[section] = {n: int(self.totals.get((section, n), 0.0)) for n in names}
        spec = out.get("speculative")
        if spec:
            spec["acceptance_rate"] = (
                spec["accepted"] / spec["proposed"] if spec["proposed"] else None
            )
            spec["mean_accepted_length"] = (
                spec["emitted"] / spec["verified"] if spec["verified"] else None
            )
        return out

    def _pool(self, pool: str) -> dict[str, Any]:
        queries = self.totals.get((f"pool:{pool}", "queries"), 0.0)
        hits = self.totals.get((f"pool:{pool}", "hits"), 0.0)
        rate = hits / queries if queries > 0 else None
        return {"queries": int(queries), "hits": int(hits), "hit_rate": rate}


def _key(family: str, sample: str, labels: Mapping[str, str]) -> tuple[str, str] | None:
    if not sample.endswith("_total"):  # a counter's _created sample
        return None
    family = family.removesuffix("_total")  # as written by a TYPE line with or without it
    if family in PREFIX_COUNTERS:
        return f"pool:{labels.get('pool', 'all')}", PREFIX_COUNTERS[family]
    if family in KV_COUNTERS:
        return "kv_bytes", KV_COUNTERS[family]
    if family in SPEC_COUNTERS:
        return "speculative", SPEC_COUNTERS[family]
    if family == BY_SOURCE and labels.get("source") in SOURCES:
        return "prefill_tokens", SOURCES[labels["source"]]
    return None


async def scrape_cache(root_url: str, headers: Mapping[str, str]) -> CacheCounters | None:
    """The counters now, or None when the server does not export them."""
    try:
        async with httpx.AsyncClient(timeout=10.0, headers=dict(headers)) as client:
            resp = await client.get(root_url + "/metrics")
    except httpx.HTTPError as exc:
        logger.debug("no /metrics at %s: %s", root_url, exc)
        return None
    if resp.status_code != 200:
        return None
    counters = CacheCounters.parse(resp.text)
    return counters if counters.totals else None


def format_reuse(result: Mapping[str, Any]) -> str:
    """The printed block of what a run's result holds of prefix reuse ("" when nothing)."""
    lines: list[str] = []

    def row(label: str, value: object) -> None:
        lines.append(f"{label:<40} {value!s:<10}")

    if "total_cached_prompt_tokens" in result:
        row("Cached prompt tokens (usage):", result["total_cached_prompt_tokens"])
    for pool, c in result.get("prefix_cache", {}).items():
        rate = "-" if c["hit_rate"] is None else f"{100 * c['hit_rate']:.1f}"
        row(f"Prefix cache hits/queries, {pool} (%):", f"{c['hits']}/{c['queries']} ({rate})")
    tokens = result.get("prefill_tokens")
    if tokens:
        row("Prefill tokens computed / cached:", f"{tokens['computed']} / {tokens['cached']}")
    kv = result.get("kv_bytes")
    if kv:
        row("KV bytes sent / reused:", f"{kv['sent']} / {kv['reused']}")
    spec = result.get("speculative")
    if spec and spec["proposed"]:
        row("Draft acceptance rate (%):", f"{100 * spec['acceptance_rate']:.1f}")
        row("Draft tokens accepted / proposed:", f"{spec['accepted']} / {spec['proposed']}")
        row("Mean tokens per verified step:", f"{spec['mean_accepted_length']:.2f}")
    if not lines:
        return ""
    title = "{s:{c}^{n}}".format(s="Prefix Reuse and Speculation", n=50, c="-")
    return "\n".join([title, *lines, "=" * 50])
