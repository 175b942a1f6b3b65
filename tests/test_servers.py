"""The test servers themselves: Knot serves the cluster zones and FakeUpstream's modes behave."""

from __future__ import annotations

import socket
import time

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from conftest import dig, query, split_address
from servers import (
    BIG,
    BIG_ADDRESSES,
    KUBERNETES,
    KUBERNETES_PTR,
    RECORD_TTL,
    SOA_TTL,
    ZONE_RECORDS,
    FakeUpstream,
    KnotServer,
)

TC = 0x0200  # the TC bit in the DNS header flags (RFC 1035 §4.1.1)


def rdata_texts(reply: dns.message.Message, qtype: str) -> set[str]:
    """Return the rdata of every answer record of one type, as text."""
    rdtype = dns.rdatatype.from_text(qtype)
    return {rdata.to_text() for rrset in reply.answer if rrset.rdtype == rdtype for rdata in rrset}


def exchange_udp(address: str, wire: bytes) -> bytes:
    """Send one datagram and return the first datagram that comes back, as raw bytes."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(2)
        udp.sendto(wire, split_address(address))
        return udp.recv(65535)


class TestKnot:
    """Knot serves the Kubernetes-style zones and counts what it receives."""

    def test_dig_gets_kubernetes_service_address(self, knot: KnotServer) -> None:
        """dig gets 10.96.0.1 for kubernetes.default.svc.cluster.local A from Knot."""
        output = dig(f"@{knot.host}", "-p", str(knot.port), "+short", KUBERNETES, "A")
        assert output.split() == ["10.96.0.1"]

    def test_dnspython_gets_kubernetes_service_address_with_ttl_30(self, knot: KnotServer) -> None:
        """An A query for the kubernetes service gets 10.96.0.1 with TTL 30 over UDP."""
        reply = query(knot.address, KUBERNETES, "A")
        assert reply.rcode() == dns.rcode.NOERROR
        assert rdata_texts(reply, "A") == {"10.96.0.1"}
        assert reply.answer[0].ttl == RECORD_TTL

    @pytest.mark.parametrize(("owner", "rtype"), sorted(ZONE_RECORDS))
    def test_every_zone_record_is_served(self, knot: KnotServer, owner: str, rtype: str) -> None:
        """Every RRset in ZONE_RECORDS is what Knot answers over TCP."""
        reply = query(knot.address, owner, rtype, tcp=True)
        assert rdata_texts(reply, rtype) == set(ZONE_RECORDS[(owner, rtype)])

    def test_aaaa_without_records_is_nodata_with_soa_ttl_5(self, knot: KnotServer) -> None:
        """AAAA for the kubernetes service is NODATA whose SOA allows 5 s of negative caching."""
        reply = query(knot.address, KUBERNETES, "AAAA")
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.answer == []
        soa = reply.authority[0]
        assert soa.rdtype == dns.rdatatype.SOA
        assert soa.ttl == SOA_TTL
        assert soa[0].minimum == SOA_TTL

    def test_unknown_service_is_nxdomain(self, knot: KnotServer) -> None:
        """A name absent from the cluster zone gets NXDOMAIN with the zone's SOA."""
        reply = query(knot.address, "missing.default.svc.cluster.local.", "A")
        assert reply.rcode() == dns.rcode.NXDOMAIN
        assert reply.authority[0].rdtype == dns.rdatatype.SOA

    def test_cname_is_followed_inside_the_zone(self, knot: KnotServer) -> None:
        """An A query for the alias gets the CNAME and web's address in one answer."""
        reply = query(knot.address, "alias.default.svc.cluster.local.", "A")
        assert rdata_texts(reply, "CNAME") == {"web.default.svc.cluster.local."}
        assert rdata_texts(reply, "A") == {"10.96.0.20"}

    def test_big_answer_is_truncated_over_plain_udp(self, knot: KnotServer) -> None:
        """The 60-address answer does not fit 512 bytes, so UDP without EDNS gets TC=1."""
        reply = query(knot.address, BIG, "A")
        assert reply.flags & TC
        assert reply.answer == []

    def test_big_answer_is_complete_over_tcp(self, knot: KnotServer) -> None:
        """Over TCP the 60-address answer arrives whole."""
        reply = query(knot.address, BIG, "A", tcp=True)
        assert not reply.flags & TC
        assert rdata_texts(reply, "A") == set(BIG_ADDRESSES)

    def test_reverse_zone_answers_ptr(self, knot: KnotServer) -> None:
        """The PTR of 10.96.0.1 names the kubernetes service."""
        reply = query(knot.address, KUBERNETES_PTR, "PTR")
        assert rdata_texts(reply, "PTR") == {KUBERNETES}

    def test_query_count_grows_by_queries_sent(self, knot: KnotServer) -> None:
        """query_count() grows by exactly the number of UDP and TCP queries sent."""
        before_udp, before_tcp = knot.query_count("udp"), knot.query_count("tcp")
        before = knot.query_count()
        for _ in range(3):
            query(knot.address, KUBERNETES, "A")
        for _ in range(2):
            query(knot.address, KUBERNETES, "A", tcp=True)
        assert knot.query_count() - before == 5
        assert knot.query_count("udp") - before_udp == 3
        assert knot.query_count("tcp") - before_tcp == 2


class TestFakeUpstreamAnswers:
    """In "answer" mode FakeUpstream answers like a small authoritative server."""

    def test_default_a_answer_echoes_question_case(self, fake_upstream: FakeUpstream) -> None:
        """Any A query gets 192.0.2.1 with TTL 30 and the question exactly as sent."""
        reply = query(fake_upstream.address, "MiXeD.Example.", "A")
        assert str(reply.question[0].name) == "MiXeD.Example."
        assert rdata_texts(reply, "A") == {"192.0.2.1"}
        assert reply.answer[0].ttl == 30

    def test_records_table_is_served_and_cname_followed(self, fake_upstream: FakeUpstream) -> None:
        """An AAAA found through a CNAME in `records` comes back as the CNAME plus the AAAA."""
        fake_upstream.records = {
            ("alias.example.", "CNAME"): [("CNAME", "target.example.", 10)],
            ("target.example.", "AAAA"): [("AAAA", "2001:db8::1", 20)],
        }
        reply = query(fake_upstream.address, "alias.example.", "AAAA")
        assert rdata_texts(reply, "CNAME") == {"target.example."}
        assert rdata_texts(reply, "AAAA") == {"2001:db8::1"}

    def test_aaaa_outside_records_is_nodata_with_soa(self, fake_upstream: FakeUpstream) -> None:
        """An AAAA query not in `records` is NODATA whose SOA carries neg_ttl."""
        fake_upstream.neg_ttl = 7
        reply = query(fake_upstream.address, "host.example.", "AAAA")
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.answer == []
        assert reply.authority[0].ttl == 7

    def test_queries_are_recorded_with_edns_details(self, fake_upstream: FakeUpstream) -> None:
        """Each received query is recorded with its transport, name, type, EDNS and DO bit."""
        query(fake_upstream.address, "a.example.", "A")
        query(fake_upstream.address, "B.example.", "AAAA", tcp=True, want_dnssec=True)
        first, second = fake_upstream.queries
        assert (first.transport, first.qname, first.qtype, first.has_edns) == (
            "udp",
            "a.example.",
            "A",
            False,
        )
        assert (second.transport, second.qname, second.qtype) == ("tcp", "B.example.", "AAAA")
        assert (second.has_edns, second.edns_payload, second.do_bit) == (True, 1232, True)

    def test_count_filters_by_name_type_and_transport(self, fake_upstream: FakeUpstream) -> None:
        """count() matches names case-insensitively and filters by qtype and transport."""
        query(fake_upstream.address, "a.example.", "A")
        query(fake_upstream.address, "A.EXAMPLE.", "A", tcp=True)
        query(fake_upstream.address, "b.example.", "AAAA")
        assert fake_upstream.count() == 3
        assert fake_upstream.count(qname="a.example") == 2
        assert fake_upstream.count(qtype="AAAA") == 1
        assert fake_upstream.count(qname="a.example.", transport="tcp") == 1
        fake_upstream.reset()
        assert fake_upstream.count() == 0

    def test_source_ports_are_recorded(self, fake_upstream: FakeUpstream) -> None:
        """source_ports() holds the client port of each query, one per client socket."""
        host, port = split_address(fake_upstream.address)
        wire = dns.message.make_query("x.example.", "A").to_wire()
        used: set[int] = set()
        for _ in range(3):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind((host, 0))
                used.add(udp.getsockname()[1])
                udp.settimeout(2)
                udp.sendto(wire, (host, port))
                udp.recv(512)
        assert fake_upstream.source_ports() == used


class TestFakeUpstreamFailures:
    """Each failure mode of FakeUpstream does what its name says."""

    @pytest.mark.parametrize(
        ("mode", "rcode", "has_soa"),
        [
            ("nxdomain", dns.rcode.NXDOMAIN, True),
            ("nosoa_nxdomain", dns.rcode.NXDOMAIN, False),
            ("nodata", dns.rcode.NOERROR, True),
            ("servfail", dns.rcode.SERVFAIL, False),
            ("refused", dns.rcode.REFUSED, False),
        ],
    )
    def test_negative_modes_set_rcode_and_soa(
        self, fake_upstream: FakeUpstream, mode: str, rcode: int, has_soa: bool
    ) -> None:
        """Negative modes answer with no records, their rcode, and a SOA only where they should."""
        fake_upstream.mode = mode
        reply = query(fake_upstream.address, "x.example.", "A")
        assert reply.rcode() == rcode
        assert reply.answer == []
        assert bool(reply.authority) == has_soa

    def test_hang_never_answers(self, fake_upstream: FakeUpstream) -> None:
        """In "hang" mode a query is received but the client times out."""
        fake_upstream.mode = "hang"
        with pytest.raises(dns.exception.Timeout):
            query(fake_upstream.address, "x.example.", "A", timeout=0.5)
        assert fake_upstream.count() == 1

    def test_slow_answers_after_delay(self, fake_upstream: FakeUpstream) -> None:
        """In "slow" mode the answer arrives, but only after `delay` seconds."""
        fake_upstream.mode = "slow"
        fake_upstream.delay = 0.3
        started = time.monotonic()
        reply = query(fake_upstream.address, "x.example.", "A", timeout=2)
        assert time.monotonic() - started >= 0.3
        assert rdata_texts(reply, "A") == {"192.0.2.1"}

    def test_truncated_sets_tc_over_udp(self, fake_upstream: FakeUpstream) -> None:
        """In "truncated" mode a UDP reply has TC=1 and no answers."""
        fake_upstream.mode = "truncated"
        reply = query(fake_upstream.address, "x.example.", "A")
        assert reply.flags & TC
        assert reply.answer == []

    def test_truncated_answers_fully_over_tcp(self, fake_upstream: FakeUpstream) -> None:
        """In "truncated" mode the TCP reply is the full answer."""
        fake_upstream.mode = "truncated"
        reply = query(fake_upstream.address, "x.example.", "A", tcp=True)
        assert not reply.flags & TC
        assert rdata_texts(reply, "A") == {"192.0.2.1"}

    def test_down_refuses_udp_and_tcp(self, fake_upstream: FakeUpstream) -> None:
        """In "down" mode the port is closed: UDP gets ICMP unreachable and TCP connect fails."""
        fake_upstream.mode = "down"
        host, port = split_address(fake_upstream.address)
        wire = dns.message.make_query("x.example.", "A").to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(2)
            udp.connect((host, port))  # a connected UDP socket reports ICMP errors
            udp.send(wire)
            with pytest.raises(ConnectionRefusedError):
                udp.recv(512)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=2).close()

    def test_down_gives_no_answer_to_dns_client(self, fake_upstream: FakeUpstream) -> None:
        """In "down" mode a DNS client over UDP gets no reply."""
        fake_upstream.mode = "down"
        with pytest.raises(dns.exception.Timeout):
            query(fake_upstream.address, "x.example.", "A", timeout=0.5)

    def test_answer_again_after_down_on_same_port(self, fake_upstream: FakeUpstream) -> None:
        """Leaving "down" reopens the same port, and UDP and TCP answer again."""
        address = fake_upstream.address
        fake_upstream.mode = "down"
        fake_upstream.mode = "answer"
        assert fake_upstream.address == address
        assert rdata_texts(query(address, "x.example.", "A"), "A") == {"192.0.2.1"}
        assert rdata_texts(query(address, "x.example.", "A", tcp=True), "A") == {"192.0.2.1"}

    def test_wrong_id_reply_does_not_match(self, fake_upstream: FakeUpstream) -> None:
        """In "wrong_id" mode the reply carries an ID other than the query's."""
        fake_upstream.mode = "wrong_id"
        message = dns.message.make_query("x.example.", "A")
        reply = dns.message.from_wire(exchange_udp(fake_upstream.address, message.to_wire()))
        assert reply.id != message.id
        assert reply.question == message.question

    def test_wrong_question_reply_does_not_match(self, fake_upstream: FakeUpstream) -> None:
        """In "wrong_question" mode the reply is for another qname."""
        fake_upstream.mode = "wrong_question"
        with pytest.raises(dns.query.BadResponse):
            query(fake_upstream.address, "x.example.", "A")

    def test_garbage_does_not_parse(self, fake_upstream: FakeUpstream) -> None:
        """In "garbage" mode the reply has the query's ID but cannot be parsed."""
        fake_upstream.mode = "garbage"
        message = dns.message.make_query("x.example.", "A")
        raw = exchange_udp(fake_upstream.address, message.to_wire())
        assert raw[:2] == message.to_wire()[:2]
        with pytest.raises(dns.exception.DNSException):
            dns.message.from_wire(raw)

    def test_tcp_close_midway_cuts_the_answer(self, fake_upstream: FakeUpstream) -> None:
        """In "tcp_close_midway" mode the TCP reply stops before its announced length."""
        fake_upstream.mode = "tcp_close_midway"
        with pytest.raises(EOFError):
            query(fake_upstream.address, "x.example.", "A", tcp=True)
