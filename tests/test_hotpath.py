"""The cache-hit fast path: repeated byte-identical queries reuse a parsed template and a rendered answer."""

from __future__ import annotations

import socket
import time
import urllib.request

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servers import KUBERNETES, SRV_NAME, WEB, free_port


def exchange(port: int, request: dns.message.Message, timeout: float = 3.0) -> dns.message.Message:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(request.to_wire(), ("127.0.0.1", port))
        return dns.message.from_wire(sock.recv(65535))


def make(qname: str, qid: int, **kw) -> dns.message.Message:
    request = dns.message.make_query(qname, kw.pop("qtype", "A"), **kw)
    request.id = qid
    return request


class TestHotPath:
    """Hits served from the rendered-answer memo keep every per-client property."""

    def test_id_echoed_on_every_repeat(self, knot, proxy_factory):
        """Identical queries with different IDs each get their own ID back."""
        proxy = proxy_factory("--upstream", knot.address)
        for qid in (1, 2, 0xFFFF, 0x1234, 7):
            reply = exchange(proxy.port, make(KUBERNETES, qid, use_edns=False))
            assert reply.id == qid and reply.rcode() == dns.rcode.NOERROR

    def test_case_as_asked_for_each_spelling(self, knot, proxy_factory):
        """Each spelling of a cached name gets its own case back, on repeats too."""
        proxy = proxy_factory("--upstream", knot.address)
        spellings = ["KUBERNETES.default.svc.cluster.local", "kubernetes.DEFAULT.svc.cluster.local", KUBERNETES]
        for _ in range(3):
            for i, spelling in enumerate(spellings):
                reply = exchange(proxy.port, make(spelling, i + 10, use_edns=False))
                assert reply.question[0].name.to_text().rstrip(".") == spelling.rstrip(".")
                assert reply.answer[0].name.to_text().lower() == KUBERNETES

    def test_ttl_counts_down_on_repeats(self, knot, proxy_factory):
        """A memoized answer is re-rendered when the whole-second TTL changes."""
        proxy = proxy_factory("--upstream", knot.address)
        first = exchange(proxy.port, make(WEB, 1, use_edns=False)).answer[0].ttl
        again = exchange(proxy.port, make(WEB, 2, use_edns=False)).answer[0].ttl
        time.sleep(2.1)
        later = exchange(proxy.port, make(WEB, 3, use_edns=False)).answer[0].ttl
        assert first == 30 and again in (29, 30)
        assert later <= first - 2

    def test_edns_and_plain_queries_answered_alike_but_framed_apart(self, knot, proxy_factory):
        """An EDNS query gets an OPT and a plain one none, from the same cache entry."""
        proxy = proxy_factory("--upstream", knot.address)
        for _ in range(2):
            plain = exchange(proxy.port, make(WEB, 5, use_edns=False))
            edns = exchange(proxy.port, make(WEB, 6, use_edns=0, payload=1232))
            assert plain.edns == -1 and edns.edns == 0
            assert plain.answer == edns.answer

    def test_do_and_cd_are_separate_entries(self, knot, proxy_factory):
        """DO=1 and CD=1 queries are cached apart from plain ones, and the flags are echoed."""
        proxy = proxy_factory("--upstream", knot.address)
        before = knot.query_count()
        for _ in range(2):
            do = exchange(proxy.port, make(WEB, 8, use_edns=0, want_dnssec=True))
            assert do.ednsflags & dns.flags.DO
            cd_request = make(WEB, 9, use_edns=False)
            cd_request.flags |= dns.flags.CD
            cd = exchange(proxy.port, cd_request)
            assert cd.flags & dns.flags.CD
            plain = exchange(proxy.port, make(WEB, 10, use_edns=False))
            assert not plain.flags & dns.flags.CD
        assert knot.query_count() == before + 3

    def test_rd_echoed(self, knot, proxy_factory):
        """RD is echoed as the client set it; RA is always set."""
        proxy = proxy_factory("--upstream", knot.address)
        for _ in range(2):
            request = make(WEB, 11, use_edns=False)
            request.flags &= ~dns.flags.RD
            reply = exchange(proxy.port, request)
            assert not reply.flags & dns.flags.RD and reply.flags & dns.flags.RA


def exchange_tcp(port: int, request: dns.message.Message, timeout: float = 3.0) -> dns.message.Message:
    return dns.query.tcp(request, "127.0.0.1", port=port, timeout=timeout)


def hit_queries(http_port: int, proto: str) -> float:
    """kube_dns_proxy_queries_total of one protocol, all qtypes."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
        return sum(
            sample.value
            for family in families
            if family.name == "kube_dns_proxy_queries"
            for sample in family.samples
            if sample.name == "kube_dns_proxy_queries_total" and sample.labels["proto"] == proto
        )


class TestOneFreshHitPath:
    """UDP and TCP answer a cache hit through the same rules."""

    @pytest.mark.parametrize("edns", [None, 1232], ids=["plain", "edns"])
    @pytest.mark.parametrize("qtype", ["A", "AAAA", "SRV"])
    def test_udp_and_tcp_hits_identical(self, knot, proxy_factory, edns, qtype):
        """The same cached entry answers UDP and TCP with the same records, TTL, flags and EDNS."""
        proxy = proxy_factory("--upstream", knot.address)
        qname = SRV_NAME if qtype == "SRV" else WEB
        kw = {"use_edns": False} if edns is None else {"use_edns": 0, "payload": edns}
        exchange(proxy.port, make(qname, 1, qtype=qtype, **kw))  # cached now
        for _ in range(3):  # a whole-second TTL boundary between the two may fall once
            udp = exchange(proxy.port, make(qname, 2, qtype=qtype, **kw))
            tcp = exchange_tcp(proxy.port, make(qname, 2, qtype=qtype, **kw))
            if [r.ttl for r in udp.answer] == [r.ttl for r in tcp.answer]:
                break
        assert udp.to_wire() == tcp.to_wire()
        assert udp.answer and udp.flags & dns.flags.RA and not udp.flags & dns.flags.AA

    @pytest.mark.parametrize("no_metrics", [False, True], ids=["metrics", "no-metrics"])
    def test_no_metrics_respected_by_udp_and_tcp_hits(self, knot, proxy_factory, no_metrics):
        """--no-metrics leaves cache hits out of the per-qtype counts on UDP and TCP alike; without it both count."""
        http_port = free_port()
        flags = ["--no-metrics"] if no_metrics else []
        proxy = proxy_factory("--upstream", knot.address, "--http", f"127.0.0.1:{http_port}", *flags)
        exchange(proxy.port, make(WEB, 1, use_edns=False))  # the miss, counted either way
        exchange_tcp(proxy.port, make(KUBERNETES, 1, use_edns=False))
        before = hit_queries(http_port, "udp"), hit_queries(http_port, "tcp")
        for qid in range(5):
            exchange(proxy.port, make(KUBERNETES, qid, use_edns=False))
            exchange_tcp(proxy.port, make(WEB, qid, use_edns=False))
        after = hit_queries(http_port, "udp"), hit_queries(http_port, "tcp")
        expected = (0, 0) if no_metrics else (5, 5)
        assert (after[0] - before[0], after[1] - before[1]) == expected
