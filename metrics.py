"""Prometheus metrics: plain counters kept by the query path, turned into metric families at scrape time.

The query path only adds to ints and dicts (a cache hit pays a few dict increments); everything
prometheus_client does happens when /metrics is scraped. Names carry one prefix and base units.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "kube_dns_proxy_"
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
QTYPE_NAMES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
    35: "NAPTR", 64: "SVCB", 65: "HTTPS", 255: "ANY",
}  # fmt: skip
# Seconds; the low buckets resolve cache hits, the high ones upstream timeouts (as CoreDNS's).
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
HIT_SAMPLE_MASK = 63  # the answer latency of one cache hit in 64 is measured: a clock read costs


class Histogram:
    """A fixed-bucket histogram as two lists: cheap to observe, turned into a family at scrape."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            total += count
            out.append((repr(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


def qtype_name(qtype: int) -> str:
    return QTYPE_NAMES.get(qtype, "other")


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode, str(rcode))


class Stats:
    """Every count the proxy keeps: the query path adds to plain ints and dicts, /metrics reads them.

    A cache hit pays a few increments, never a prometheus_client call; the families are built at
    scrape time by ProxyCollector. as_dict() is what the summary and "stopped" log lines report.
    """

    COUNTERS = (
        "queries",
        "hits",
        "stale_served",
        "misses",
        "coalesced",
        "servfail",
        "dropped_malformed",
        "dropped_qr",
        "dropped_overload",
        "formerr",
        "notimp",
        "handler_errors",
        "refused",
        "prefetches",
        "negative_held",
        "recovery_refreshes",
        "autopath_answers",
        "autopath_skipped",
        "autopath_abandoned",
    )

    def __init__(self) -> None:
        self.queries = 0  # packets received
        self.hits = 0
        self.stale_served = 0
        self.misses = 0
        self.coalesced = 0
        self.servfail = 0
        self.dropped_malformed = 0
        self.dropped_qr = 0
        self.dropped_overload = 0
        self.formerr = 0
        self.notimp = 0
        self.handler_errors = 0
        self.refused = 0
        self.prefetches = 0
        self.negative_held = 0
        self.recovery_refreshes = 0  # background refreshes of names answered stale, once their upstream is back
        self.autopath_answers = 0  # --autopath walks that answered a CNAME to a later search candidate
        self.autopath_skipped = 0  # NXDOMAIN candidates those walks went past (queries the pods did not send)
        self.autopath_abandoned = 0  # walks given up (SERVFAIL, no answer in time): the plain NXDOMAIN answered
        # How long past expiry the stalest answer of the current stale episode was (0: none).
        self.stale_max_age = 0.0
        self.queries_by_type: dict[tuple[str, int], int] = defaultdict(int)  # (proto, qtype)
        self.responses: dict[int, int] = defaultdict(int)  # rcode
        self.answer_latency: dict[str, Histogram] = defaultdict(Histogram)  # cache outcome
        self.upstream_results: dict[tuple[str, str, str], int] = defaultdict(int)  # (server, proto, result)
        self.upstream_latency: dict[str, Histogram] = defaultdict(Histogram)  # server
        self.upstream_dropped: dict[tuple[str, str, str], int] = defaultdict(int)  # (server, proto, reason)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COUNTERS}

    def on_upstream_dropped(self, server: Any, protocol: str, reason: str) -> None:
        """Hook for upstream.Upstreams: a reply that did not match a query in flight (RFC 5452 §9.1)."""
        self.upstream_dropped[(str(server.endpoint), protocol, reason)] += 1

    def on_upstream_result(self, server: Any, protocol: str, result: str, seconds: float) -> None:
        """Hook for upstream.Upstreams: one call per try."""
        name = str(server.endpoint)
        self.upstream_results[(name, protocol, result)] += 1
        if result in ("ok", "servfail"):
            self.upstream_latency[name].observe(seconds)


class ProxyCollector:
    """A prometheus_client collector reading the live proxy's stats, cache and upstreams when scraped."""

    def __init__(
        self,
        stats: Stats,
        cache: Any,
        upstream_groups: Callable[[], Iterable[Any]],
        persister: Any = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.cache = cache
        self.upstream_groups = upstream_groups
        self.persister = persister
        self.timer = timer

    def collect(self) -> Iterator[Any]:
        s = self.stats

        queries = CounterMetricFamily(PREFIX + "queries", "DNS queries received, by protocol and qtype.",
                                      labels=["proto", "qtype"])  # fmt: skip
        merged: dict[tuple[str, str], int] = defaultdict(int)
        for (proto, qtype), count in list(s.queries_by_type.items()):
            merged[(proto, qtype_name(qtype))] += count
        for (proto, qname_type), count in sorted(merged.items()):
            queries.add_metric([proto, qname_type], count)
        yield queries

        responses = CounterMetricFamily(PREFIX + "responses", "DNS responses sent, by rcode.", labels=["rcode"])
        merged_rcodes: dict[str, int] = defaultdict(int)
        for rcode, count in list(s.responses.items()):
            merged_rcodes[rcode_name(rcode)] += count
        for rcode_text, count in sorted(merged_rcodes.items()):
            responses.add_metric([rcode_text], count)
        yield responses

        dropped = CounterMetricFamily(PREFIX + "dropped", "Packets dropped without an answer, by reason.",
                                      labels=["reason"])  # fmt: skip
        dropped.add_metric(["malformed"], s.dropped_malformed)
        dropped.add_metric(["qr"], s.dropped_qr)
        dropped.add_metric(["overload"], s.dropped_overload)
        yield dropped

        refused = CounterMetricFamily(PREFIX + "refused_clients", "Queries refused by the --allow access list.")
        refused.add_metric([], s.refused)
        yield refused

        hits = CounterMetricFamily(PREFIX + "cache_hits", "Queries answered from the cache, by entry state.",
                                   labels=["state"])  # fmt: skip
        hits.add_metric(["fresh"], s.hits)
        hits.add_metric(["stale"], s.stale_served)
        yield hits
        misses = CounterMetricFamily(PREFIX + "cache_misses", "Queries for names not in the cache.")
        misses.add_metric([], s.misses)
        yield misses
        stale = CounterMetricFamily(PREFIX + "stale_answers", "Stale answers served (RFC 8767).")
        stale.add_metric([], s.stale_served)
        yield stale
        stale_age = GaugeMetricFamily(
            PREFIX + "stale_answer_max_age_seconds",
            "How long past expiry the stalest answer served in the current stale episode was (0: none).",
        )
        stale_age.add_metric([], s.stale_max_age)
        yield stale_age

        cache = self.cache
        fresh_count, stale_count = cache.counts(self.timer())
        entries = GaugeMetricFamily(PREFIX + "cache_entries", "Cache entries, by state.", labels=["state"])
        entries.add_metric(["fresh"], fresh_count)
        entries.add_metric(["stale"], stale_count)
        yield entries
        capacity = GaugeMetricFamily(PREFIX + "cache_capacity_entries", "Cache capacity (--cache-size).")
        capacity.add_metric([], cache.maxsize)
        yield capacity
        evictions = CounterMetricFamily(PREFIX + "cache_evictions", "Entries evicted for capacity (never for age).")
        evictions.add_metric([], cache.evictions)
        yield evictions
        inserts = CounterMetricFamily(PREFIX + "cache_inserts", "Entries stored or replaced.")
        inserts.add_metric([], cache.inserts)
        yield inserts
        coalesced = CounterMetricFamily(PREFIX + "coalesced", "Queries that joined an upstream query in flight.")
        coalesced.add_metric([], s.coalesced)
        yield coalesced
        recovery = CounterMetricFamily(
            PREFIX + "recovery_refreshes",
            "Background refreshes of names answered stale, sent once their upstream answered again.",
        )
        recovery.add_metric([], s.recovery_refreshes)
        yield recovery

        for name, documentation, value in (
            ("autopath_answers", "Answers --autopath made: a CNAME to the first later search candidate that exists.",
             s.autopath_answers),
            ("autopath_candidates_skipped", "NXDOMAIN search candidates --autopath walked past for the pods.",
             s.autopath_skipped),
            ("autopath_walks_abandoned",
             "--autopath walks given up (a candidate failed or time ran out): the plain NXDOMAIN was answered.",
             s.autopath_abandoned),
        ):  # fmt: skip
            family = CounterMetricFamily(PREFIX + name, documentation)
            family.add_metric([], value)
            yield family

        upstream = CounterMetricFamily(PREFIX + "upstream_queries", "Tries sent upstream, by server, protocol, result.",
                                       labels=["upstream", "proto", "result"])  # fmt: skip
        for (server, proto, result), count in sorted(s.upstream_results.items()):
            upstream.add_metric([server, proto, result], count)
        yield upstream
        dropped_replies = CounterMetricFamily(
            PREFIX + "upstream_replies_dropped",
            "Upstream replies dropped unused: no query in flight with that ID (id), another question (question), "
            "or shorter than a header (short); RFC 5452.",
            labels=["upstream", "proto", "reason"],
        )
        for (server, proto, reason), count in sorted(s.upstream_dropped.items()):
            dropped_replies.add_metric([server, proto, reason], count)
        yield dropped_replies
        up = GaugeMetricFamily(PREFIX + "upstream_up", "1 while the upstream is healthy, 0 while marked down.",
                               labels=["upstream"])  # fmt: skip
        for group in self.upstream_groups():
            for server in group.servers:
                up.add_metric([str(server.endpoint)], 0 if server.down else 1)
        yield up
        if self.persister is not None:
            yield from _persistence_families(self.persister)
        yield _histogram_family(PREFIX + "upstream_duration_seconds", "Time of answered upstream tries.",
                                "upstream", s.upstream_latency)  # fmt: skip
        yield _histogram_family(
            PREFIX + "answer_duration_seconds",
            "Time from query in to answer out, by cache outcome (hits sampled 1 in 64).",
            "cache",
            s.answer_latency,
        )


def _persistence_families(persister: Any) -> Iterator[Any]:
    """The cache file: saves, the last save's size and duration, what the start loaded."""
    saves = CounterMetricFamily(PREFIX + "cache_saves", "Snapshots of the cache written to --cache-file, by result.",
                                labels=["result"])  # fmt: skip
    saves.add_metric(["ok"], persister.saves)
    saves.add_metric(["failed"], persister.save_failures)
    yield saves
    for name, documentation, value in (
        ("cache_file_bytes", "Size of the last snapshot written.", persister.last_save_bytes),
        ("cache_saved_entries", "Entries in the last snapshot written.", persister.last_save_entries),
        ("cache_save_duration_seconds", "Time the last snapshot took.", persister.last_save_seconds),
        ("cache_loaded_entries", "Entries loaded from the cache file at start.",
         persister.loaded.entries if persister.loaded else 0),
    ):  # fmt: skip
        gauge = GaugeMetricFamily(PREFIX + name, documentation)
        gauge.add_metric([], value)
        yield gauge


def _histogram_family(
    name: str, documentation: str, label: str, histograms: dict[str, Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, histogram in sorted(histograms.items()):
        family.add_metric([value], histogram.cumulative(), sum_value=histogram.sum)
    return family


def make_registry(collector: ProxyCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
