"""Metrics, cache control and the summary log, checked over real HTTP against a running proxy."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import dns.rcode
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT, query
from control import loopback_only
from servers import free_port


def scrape(http_port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def start(proxy_factory, fake_upstream, *extra):
    http_port = free_port()
    proxy = proxy_factory(
        "--upstream", fake_upstream.address, "--http", f"127.0.0.1:{http_port}", "--upstream-timeout", "0.5",
        "--deadline", "1", *extra,
    )  # fmt: skip
    return proxy, http_port


def test_counters_match_a_known_sequence(fake_upstream, proxy_factory):
    """After hits, misses, NXDOMAIN, stale answers and coalesced misses, each counter equals what happened."""
    fake_upstream.ttl = 1
    proxy, http_port = start(proxy_factory, fake_upstream)
    # 3 misses, then 4 fresh hits of one of them (UDP), 1 TCP hit.
    for name in ("m1.example", "m2.example", "m3.example"):
        query(proxy.address, name)
    for _ in range(4):
        query(proxy.address, "m1.example")
    query(proxy.address, "m1.example", tcp=True)
    # One AAAA NODATA miss.
    assert query(proxy.address, "m1.example", "AAAA").rcode() == dns.rcode.NOERROR
    # 10 concurrent identical misses: 1 upstream query, 9 coalesced.
    fake_upstream.mode = "slow"
    fake_upstream.delay = 0.4
    threads = [threading.Thread(target=query, args=(proxy.address, "together.example")) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    # Two stale answers for m2 with the upstream down.
    time.sleep(1.1)
    fake_upstream.mode = "down"
    assert query(proxy.address, "m2.example", timeout=5).rcode() == dns.rcode.NOERROR
    assert query(proxy.address, "m2.example", timeout=5).rcode() == dns.rcode.NOERROR
    samples = scrape(http_port)
    assert value(samples, "kube_dns_proxy_cache_misses_total") == 3 + 1 + 10
    assert value(samples, "kube_dns_proxy_coalesced_total") == 9
    assert value(samples, "kube_dns_proxy_cache_hits_total", state="fresh") == 5
    assert value(samples, "kube_dns_proxy_cache_hits_total", state="stale") == 2
    assert value(samples, "kube_dns_proxy_stale_answers_total") == 2
    assert value(samples, "kube_dns_proxy_queries_total", proto="udp", qtype="A") == 3 + 4 + 10 + 2
    assert value(samples, "kube_dns_proxy_queries_total", proto="tcp", qtype="A") == 1
    assert value(samples, "kube_dns_proxy_queries_total", proto="udp", qtype="AAAA") == 1
    assert value(samples, "kube_dns_proxy_responses_total", rcode="NOERROR") == 3 + 4 + 1 + 1 + 10 + 2
    assert value(samples, "kube_dns_proxy_cache_inserts_total") == 3 + 1 + 1
    assert value(samples, "kube_dns_proxy_cache_entries", state="stale") >= 1
    assert value(samples, "kube_dns_proxy_stale_answer_max_age_seconds") > 0
    upstream = fake_upstream.address
    assert value(samples, "kube_dns_proxy_upstream_queries_total", upstream=upstream, proto="udp", result="ok") == 5
    assert value(samples, "kube_dns_proxy_upstream_up", upstream=fake_upstream.address) == 0
    assert value(samples, "kube_dns_proxy_answer_duration_seconds_count", cache="miss") == 14
    assert value(samples, "kube_dns_proxy_answer_duration_seconds_count", cache="stale") == 2


def test_dropped_and_refused_counted(fake_upstream, proxy_factory):
    """Malformed packets, QR=1 packets and FORMERR answers are counted by reason and rcode."""
    import socket

    proxy, http_port = start(proxy_factory, fake_upstream)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x00\x01", ("127.0.0.1", proxy.port))  # too short
        sock.sendto(b"\x00\x01\x80\x00" + b"\x00" * 8, ("127.0.0.1", proxy.port))  # QR=1
        sock.sendto(b"\x00\x01\x01\x00" + b"\x00" * 8, ("127.0.0.1", proxy.port))  # QDCOUNT 0: FORMERR
        sock.settimeout(2)
        sock.recv(512)
    samples = scrape(http_port)
    assert value(samples, "kube_dns_proxy_dropped_total", reason="malformed") == 1
    assert value(samples, "kube_dns_proxy_dropped_total", reason="qr") == 1
    assert value(samples, "kube_dns_proxy_responses_total", rcode="FORMERR") == 1


def test_purge_over_http_refetches(fake_upstream, proxy_factory):
    """A name purged over HTTP is fetched from the upstream on its next query; other names stay cached."""
    proxy, http_port = start(proxy_factory, fake_upstream)
    query(proxy.address, "purge-me.example")
    query(proxy.address, "keep-me.example")
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/cache/purge?name=purge-me.example", data=b"")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.loads(response.read())["purged"] == 1
    query(proxy.address, "purge-me.example")
    query(proxy.address, "keep-me.example")
    assert fake_upstream.count(qname="purge-me.example") == 2
    assert fake_upstream.count(qname="keep-me.example") == 1


def test_show_and_purge_from_the_command_line(fake_upstream, proxy_factory):
    """`proxy.py cache show` lists a cached name; `proxy.py cache purge` drops it and it is refetched."""
    proxy, http_port = start(proxy_factory, fake_upstream)
    query(proxy.address, "cli.example")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "proxy.py", "cache", *args, "--http", f"127.0.0.1:{http_port}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )

    shown = json.loads(cli("show", "cli.example").stdout)
    assert [(e["name"], e["type"], e["state"]) for e in shown["entries"]] == [("cli.example.", "A", "fresh")]
    assert json.loads(cli("purge", "cli.example").stdout)["purged"] == 1
    assert json.loads(cli("show", "cli.example").stdout)["entries"] == []
    query(proxy.address, "cli.example")
    assert fake_upstream.count(qname="cli.example") == 2
    assert json.loads(cli("purge", "--all").stdout)["purged"] == 1


def test_cache_pages_refuse_non_loopback_clients():
    """Cache control answers loopback clients only: the HTTP address may be reachable by pods."""
    page = loopback_only(lambda environ: ("200 OK", "text/plain", b"ok"))
    assert page({"REMOTE_ADDR": "127.0.0.1"})[0] == "200 OK"
    assert page({"REMOTE_ADDR": "::1"})[0] == "200 OK"
    assert page({"REMOTE_ADDR": "10.1.2.3"})[0].startswith("403")
    assert page({"REMOTE_ADDR": "169.254.20.10"})[0].startswith("403")


def test_health_and_ready(fake_upstream, proxy_factory):
    """/health answers 200 while the DNS loop answers, even with the upstream down; /ready is 200 once serving."""
    proxy, http_port = start(proxy_factory, fake_upstream)
    fake_upstream.mode = "down"
    for path in ("/health", "/ready"):
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=5) as response:
            assert response.status == 200


def test_periodic_summary_line(fake_upstream, proxy_factory):
    """--summary-interval logs one summary line per interval with queries and hit ratio."""
    proxy, _ = start(proxy_factory, fake_upstream, "--summary-interval", "1")
    query(proxy.address, "s.example")
    query(proxy.address, "s.example")
    deadline = time.monotonic() + 5
    summaries = []
    while time.monotonic() < deadline and not summaries:
        summaries = [line for line in proxy.logs() if line.get("event") == "summary" and line.get("queries")]
        time.sleep(0.2)
    assert summaries and summaries[0]["queries"] == 2 and summaries[0]["hit_ratio"] == 0.5


def test_cache_file_metrics(fake_upstream, proxy_factory, tmp_path):
    """With --cache-file, saves, the snapshot size and entries appear in /metrics."""
    proxy, http_port = start(
        proxy_factory, fake_upstream, "--cache-file", str(tmp_path / "cache.snapshot"), "--save-interval", "0.3"
    )
    query(proxy.address, "saved.example")
    deadline = time.monotonic() + 5
    samples = scrape(http_port)
    while time.monotonic() < deadline and value(samples, "kube_dns_proxy_cache_saved_entries") < 1:
        time.sleep(0.2)
        samples = scrape(http_port)
    assert value(samples, "kube_dns_proxy_cache_saves_total", result="ok") >= 1
    assert value(samples, "kube_dns_proxy_cache_saved_entries") == 1
    assert value(samples, "kube_dns_proxy_cache_file_bytes") == (tmp_path / "cache.snapshot").stat().st_size
