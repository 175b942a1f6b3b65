"""Serving stale (RFC 8767) end to end: real sockets, a real proxy process, an upstream that fails.

The behaviour row by row (client timer, known down, failure recheck, --max-stale, --stale-ttl) is
specified in-process with a fake clock in test_outage_spec.py; these tests prove the wiring.
"""

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


def test_uncached_name_gets_servfail_within_deadline(fake_upstream, proxy_factory):
    """With the upstream hanging, an uncached name gets SERVFAIL within the deadline, never silence."""
    proxy = proxy_factory("--upstream", fake_upstream.address, "--upstream-timeout", "0.5", "--deadline", "1.5")
    fake_upstream.mode = "hang"
    started = time.monotonic()
    reply = query(proxy.address, "unknown.default.svc.cluster.local", timeout=5)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 2.0


def test_nxdomain_from_upstream_replaces_stale(fake_upstream, proxy_factory):
    """A fresh NXDOMAIN counts as a refresh and replaces the stale positive answer (RFC 8767 §4)."""
    fake_upstream.ttl = 1
    proxy = proxy_factory("--upstream", fake_upstream.address, *FAST)
    warm(proxy)
    time.sleep(1.2)
    fake_upstream.mode = "nxdomain"
    assert query(proxy.address, "svc.default.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN


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
