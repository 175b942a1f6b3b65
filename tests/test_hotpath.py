"""The cache-hit fast path: repeated byte-identical queries reuse a parsed template and a rendered answer."""

from __future__ import annotations

import socket
import time

import dns.flags
import dns.message
import dns.rcode

from servers import KUBERNETES, WEB


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
