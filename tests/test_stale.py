"""Serving stale (RFC 8767): expired entries are kept and answered while the upstream cannot answer."""

from __future__ import annotations

import time

import dns.edns
import dns.exception
import dns.flags
import dns.rcode
import pytest

from conftest import query

FAST = ("--upstream-timeout", "0.5", "--deadline", "1.0")


def a_records(reply) -> list[str]:
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


def ttls(reply) -> set[int]:
    return {rrset.ttl for rrset in reply.answer}


def warm(proxy, qname: str = "svc.default.svc.cluster.local") -> None:
    reply = query(proxy.address, qname)
    assert reply.rcode() == dns.rcode.NOERROR and a_records(reply) == ["192.0.2.1"]


@pytest.mark.parametrize("mode", ["down", "hang", "servfail", "refused", "garbage"])
def test_expired_entry_served_stale_when_upstream_fails(fake_upstream, proxy_factory, mode):
    """Past its TTL, a cached name is answered from the cache, TTL 30, while the upstream fails."""
    fake_upstream.ttl = 1
    proxy = proxy_factory("--upstream", fake_upstream.address, *FAST)
    warm(proxy)
    fake_upstream.mode = mode
    time.sleep(1.2)
    reply = query(proxy.address, "svc.default.svc.cluster.local", edns=1232)
    assert reply.rcode() == dns.rcode.NOERROR
    assert a_records(reply) == ["192.0.2.1"]
    assert ttls(reply) == {30}
    ede = [o for o in reply.options if o.otype == dns.edns.OptionType.EDE]
    assert ede and ede[0].code == 3  # Stale Answer (RFC 8914)


def test_stale_ttl_flag(fake_upstream, proxy_factory):
    """--stale-ttl sets the TTL of stale answers."""
    fake_upstream.ttl = 1
    proxy = proxy_factory("--upstream", fake_upstream.address, "--stale-ttl", "7", *FAST)
    warm(proxy)
    fake_upstream.mode = "down"
    time.sleep(1.2)
    assert ttls(query(proxy.address, "svc.default.svc.cluster.local")) == {7}


def test_hanging_upstream_first_stale_within_client_timer_then_fast(fake_upstream, proxy_factory):
    """With a hanging upstream the first stale answer comes within the stale-answer timeout, the next ones at once."""
    fake_upstream.ttl = 1
    proxy = proxy_factory(
        "--upstream",
        fake_upstream.address,
        "--stale-answer-timeout",
        "0.8",
        "--upstream-timeout",
        "1.5",
        "--deadline",
        "3",
    )
    warm(proxy)
    fake_upstream.mode = "hang"
    time.sleep(1.2)
    started = time.monotonic()
    first = query(proxy.address, "svc.default.svc.cluster.local", timeout=5)
    first_took = time.monotonic() - started
    assert a_records(first) == ["192.0.2.1"]
    assert 0.7 <= first_took < 1.3
    for _ in range(5):
        started = time.monotonic()
        again = query(proxy.address, "svc.default.svc.cluster.local", timeout=5)
        assert a_records(again) == ["192.0.2.1"]
        assert time.monotonic() - started < 0.05


def test_uncached_name_gets_servfail_within_deadline(fake_upstream, proxy_factory):
    """With the upstream hanging, an uncached name gets SERVFAIL within the deadline, never silence."""
    proxy = proxy_factory("--upstream", fake_upstream.address, "--upstream-timeout", "0.5", "--deadline", "1.5")
    fake_upstream.mode = "hang"
    started = time.monotonic()
    reply = query(proxy.address, "unknown.default.svc.cluster.local", timeout=5)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 2.0


def test_servfail_at_once_when_upstream_known_down(fake_upstream, proxy_factory):
    """Once the upstream is marked down, an uncached name gets SERVFAIL at once."""
    proxy = proxy_factory("--upstream", fake_upstream.address, *FAST)
    fake_upstream.mode = "hang"
    query(proxy.address, "first.example", timeout=5)  # two failed tries mark it down
    started = time.monotonic()
    reply = query(proxy.address, "second.example", timeout=5)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 0.2


def test_fresh_data_replaces_stale_when_upstream_returns(fake_upstream, proxy_factory):
    """When the upstream answers again, fresh data replaces the stale entry."""
    fake_upstream.ttl = 1
    proxy = proxy_factory("--upstream", fake_upstream.address, "--failure-recheck", "0.5", *FAST)
    warm(proxy)
    fake_upstream.mode = "down"
    time.sleep(1.2)
    assert ttls(query(proxy.address, "svc.default.svc.cluster.local")) == {30}
    fake_upstream.records = {("svc.default.svc.cluster.local", "A"): [("A", "192.0.2.99", 1)]}
    fake_upstream.mode = "answer"
    deadline = time.monotonic() + 5
    fresh = None
    while time.monotonic() < deadline:
        reply = query(proxy.address, "svc.default.svc.cluster.local")
        if a_records(reply) == ["192.0.2.99"]:
            fresh = reply
            break
        time.sleep(0.2)
    assert fresh is not None, "fresh data never replaced the stale entry"
    assert ttls(fresh) == {1}


def test_nxdomain_from_upstream_replaces_stale(fake_upstream, proxy_factory):
    """A fresh NXDOMAIN counts as a refresh and replaces the stale positive answer (RFC 8767 §4)."""
    fake_upstream.ttl = 1
    proxy = proxy_factory("--upstream", fake_upstream.address, *FAST)
    warm(proxy)
    time.sleep(1.2)
    fake_upstream.mode = "nxdomain"
    assert query(proxy.address, "svc.default.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN


def test_max_stale_zero_turns_stale_off(fake_upstream, proxy_factory):
    """--max-stale 0: an expired entry is not served; the client gets SERVFAIL."""
    fake_upstream.ttl = 1
    proxy = proxy_factory("--upstream", fake_upstream.address, "--max-stale", "0", *FAST)
    warm(proxy)
    fake_upstream.mode = "down"
    time.sleep(1.2)
    assert query(proxy.address, "svc.default.svc.cluster.local", timeout=5).rcode() == dns.rcode.SERVFAIL


def test_max_stale_limits_stale_age(fake_upstream, proxy_factory):
    """--max-stale N: stale answers stop N seconds after expiry."""
    fake_upstream.ttl = 1
    proxy = proxy_factory("--upstream", fake_upstream.address, "--max-stale", "1", *FAST)
    warm(proxy)
    fake_upstream.mode = "down"
    time.sleep(1.3)
    assert query(proxy.address, "svc.default.svc.cluster.local").rcode() == dns.rcode.NOERROR
    time.sleep(1.2)
    assert query(proxy.address, "svc.default.svc.cluster.local", timeout=5).rcode() == dns.rcode.SERVFAIL


def test_stale_entries_survive_long_outage(fake_upstream, proxy_factory):
    """Stale entries are never evicted for age: many TTLs later they are still served."""
    fake_upstream.ttl = 1
    proxy = proxy_factory("--upstream", fake_upstream.address, *FAST)
    names = [f"n{i}.default.svc.cluster.local" for i in range(20)]
    for name in names:
        warm(proxy, name)
    fake_upstream.mode = "down"
    time.sleep(3.5)
    for name in names:
        assert a_records(query(proxy.address, name)) == ["192.0.2.1"]


def test_stale_serving_logged_once_not_per_answer(fake_upstream, proxy_factory):
    """Stale serving is logged as one started line and one ended line, not one line per stale answer."""
    fake_upstream.ttl = 1
    proxy = proxy_factory("--upstream", fake_upstream.address, *FAST)
    warm(proxy)
    fake_upstream.mode = "down"
    time.sleep(1.2)
    for _ in range(30):
        query(proxy.address, "svc.default.svc.cluster.local")
    events = [line.get("event") for line in proxy.logs()]
    assert events.count("stale_serving_started") == 1
    assert events.count("upstream_down") == 1
    proxy.stop()
    assert all(line.get("level") != "info" or "qname" not in line for line in proxy.logs())
