"""Forwarding: coalescing, spoofing resilience, TCP fallback, health and the upstream's view of our queries."""

from __future__ import annotations

import threading
import time

import dns.rcode

import transport
from conftest import query

FAST = ("--upstream-timeout", "0.5", "--deadline", "1.0")


def a_records(reply) -> list[str]:
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


def test_fifty_identical_misses_make_one_upstream_query(fake_upstream, proxy_factory):
    """50 concurrent identical uncached queries cause exactly one upstream query; each gets its own ID and case."""
    fake_upstream.mode = "slow"
    fake_upstream.delay = 0.5
    proxy = proxy_factory("--upstream", fake_upstream.address)
    replies: list = [None] * 50
    names = ["Same.Default.svc.cluster.local" if i % 2 else "same.default.SVC.cluster.local" for i in range(50)]

    def ask(i: int) -> None:
        replies[i] = query(proxy.address, names[i], timeout=5)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert fake_upstream.count(qname="same.default.svc.cluster.local") == 1
    for i, reply in enumerate(replies):
        assert reply is not None and a_records(reply) == ["192.0.2.1"]
        assert reply.question[0].name.to_text() == names[i] + "."


def test_truncated_udp_reply_retried_over_tcp(fake_upstream, proxy_factory):
    """An upstream UDP reply with TC=1 is retried over TCP and the whole answer is used."""
    fake_upstream.mode = "truncated"
    proxy = proxy_factory("--upstream", fake_upstream.address)
    reply = query(proxy.address, "tc.default.svc.cluster.local")
    assert a_records(reply) == ["192.0.2.1"]
    assert fake_upstream.count(transport="udp") == 1 and fake_upstream.count(transport="tcp") == 1


def test_force_tcp_sends_everything_over_tcp(fake_upstream, proxy_factory):
    """--force-tcp: the upstream sees only TCP queries."""
    proxy = proxy_factory("--upstream", fake_upstream.address, "--force-tcp")
    for i in range(3):
        assert a_records(query(proxy.address, f"t{i}.default.svc.cluster.local")) == ["192.0.2.1"]
    assert fake_upstream.count(transport="tcp") == 3 and fake_upstream.count(transport="udp") == 0


def test_upstream_queries_use_random_ids_and_edns_1232(fake_upstream, proxy_factory):
    """Each upstream query has a fresh random ID (not the client's) and EDNS payload 1232 (RFC 5452, 6891)."""
    proxy = proxy_factory("--upstream", fake_upstream.address)
    for i in range(20):
        query(proxy.address, f"id{i}.default.svc.cluster.local")
    received = fake_upstream.queries
    ids = {q.id for q in received}
    assert len(received) == 20 and len(ids) >= 19
    assert all(q.has_edns and q.edns_payload == 1232 for q in received)


def test_upstream_queries_spread_over_the_socket_pool(fake_upstream, proxy_factory):
    """Upstream queries go out from a small pool of sockets, each on its own random port (RFC 5452 §9.2):
    as many source ports as sockets, however many queries (one conntrack entry per socket)."""
    proxy = proxy_factory("--upstream", fake_upstream.address)
    for i in range(20):
        query(proxy.address, f"port{i}.default.svc.cluster.local")
    assert len(fake_upstream.source_ports("udp")) == transport.UDP_POOL_SIZE


def test_reply_with_wrong_id_is_ignored(fake_upstream, proxy_factory):
    """A reply with another ID is never used: the client gets SERVFAIL and nothing is cached."""
    fake_upstream.mode = "wrong_id"
    proxy = proxy_factory("--upstream", fake_upstream.address, *FAST)
    assert query(proxy.address, "spoof.default.svc.cluster.local", timeout=5).rcode() == dns.rcode.SERVFAIL
    fake_upstream.mode = "answer"
    fake_upstream.reset()
    # Nothing was cached from the spoofed replies: the name is asked upstream again.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        reply = query(proxy.address, "spoof.default.svc.cluster.local", timeout=5)
        if reply.rcode() == dns.rcode.NOERROR:
            break
        time.sleep(0.2)
    assert a_records(reply) == ["192.0.2.1"]
    assert fake_upstream.count(qname="spoof.default.svc.cluster.local") >= 1


def test_reply_for_another_question_is_ignored(fake_upstream, proxy_factory):
    """A reply whose question differs from ours is never used (RFC 5452 §9.1)."""
    fake_upstream.mode = "wrong_question"
    proxy = proxy_factory("--upstream", fake_upstream.address, *FAST)
    assert query(proxy.address, "q.default.svc.cluster.local", timeout=5).rcode() == dns.rcode.SERVFAIL


def test_servfail_from_upstream_is_not_cached(fake_upstream, proxy_factory):
    """An upstream SERVFAIL is passed on as SERVFAIL and not cached: the next query asks again."""
    fake_upstream.mode = "servfail"
    proxy = proxy_factory("--upstream", fake_upstream.address)
    assert query(proxy.address, "sf.default.svc.cluster.local").rcode() == dns.rcode.SERVFAIL
    fake_upstream.mode = "answer"
    assert a_records(query(proxy.address, "sf.default.svc.cluster.local")) == ["192.0.2.1"]


def test_nxdomain_without_soa_not_cached(fake_upstream, proxy_factory):
    """NXDOMAIN without an SOA is answered but not cached (RFC 2308 §5)."""
    fake_upstream.mode = "nosoa_nxdomain"
    proxy = proxy_factory("--upstream", fake_upstream.address)
    for _ in range(2):
        assert query(proxy.address, "gone.default.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert fake_upstream.count(qname="gone.default.svc.cluster.local") == 2


def test_second_upstream_used_when_first_down(fake_upstream, proxy_factory):
    """With the first upstream down, the next one answers, and the down one is then skipped."""
    from servers import FakeUpstream

    with FakeUpstream() as second:
        fake_upstream.mode = "down"
        proxy = proxy_factory("--upstream", fake_upstream.address, "--upstream", second.address)
        for i in range(5):
            assert a_records(query(proxy.address, f"h{i}.default.svc.cluster.local")) == ["192.0.2.1"]
        assert second.count() == 5
        assert any(line.get("event") == "upstream_down" for line in proxy.logs())


def test_upstream_recovery_logged(fake_upstream, proxy_factory):
    """An upstream marked down and answering again is logged as up."""
    proxy = proxy_factory("--upstream", fake_upstream.address, "--failure-recheck", "0.3", *FAST)
    fake_upstream.mode = "down"
    query(proxy.address, "x.default.svc.cluster.local", timeout=5)
    fake_upstream.mode = "answer"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(line.get("event") == "upstream_up" for line in proxy.logs()):
        time.sleep(0.1)
    assert any(line.get("event") == "upstream_up" for line in proxy.logs())
