"""Serving over UDP and TCP against a real authoritative server (Knot): answers, caching, framing, EDNS."""

from __future__ import annotations

import random
import socket
import struct
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from conftest import dig, query
from servers import BIG, BIG_ADDRESSES, KUBERNETES, KUBERNETES_PTR, SRV_NAME, WEB


def answer_texts(reply: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


def raw_udp(address: tuple[str, int], payload: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, address)
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def tcp_frame(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> bytes:
    return recv_exact(sock, struct.unpack("!H", recv_exact(sock, 2))[0])


class TestAnswers:
    """Answers through the proxy are the authoritative server's, and repeats come from the cache."""

    def test_dig_gets_upstream_answer_then_cached_with_lower_ttl(self, knot, proxy_factory):
        """dig gets Knot's A record; a second ask does not reach Knot and shows a lower TTL."""
        proxy = proxy_factory("--upstream", knot.address)
        before = knot.query_count()
        first = dig("@127.0.0.1", "-p", str(proxy.port), KUBERNETES, "+noall", "+answer")
        assert "10.96.0.1" in first
        assert knot.query_count() == before + 1
        first_ttl = int(first.split()[1])
        time.sleep(1.1)
        second = dig("@127.0.0.1", "-p", str(proxy.port), KUBERNETES, "+noall", "+answer")
        assert "10.96.0.1" in second
        assert int(second.split()[1]) < first_ttl
        assert knot.query_count() == before + 1

    def test_record_types_match_authoritative(self, knot, proxy_factory):
        """SRV, PTR, AAAA and CNAME answers are the authoritative ones."""
        proxy = proxy_factory("--upstream", knot.address)
        for qname, qtype in [
            (SRV_NAME, "SRV"),
            (KUBERNETES_PTR, "PTR"),
            (WEB, "AAAA"),
            ("alias.default.svc.cluster.local", "A"),
        ]:
            via_proxy = query(proxy.address, qname, qtype)
            direct = query(knot.address, qname, qtype)
            assert via_proxy.rcode() == dns.rcode.NOERROR
            assert answer_texts(via_proxy) == answer_texts(direct)

    def test_nxdomain_is_negatively_cached(self, knot, proxy_factory):
        """NXDOMAIN with the zone's SOA is cached: a repeat does not reach upstream (RFC 2308)."""
        proxy = proxy_factory("--upstream", knot.address)
        before = knot.query_count()
        for _ in range(3):
            reply = query(proxy.address, "nope.default.svc.cluster.local", "A")
            assert reply.rcode() == dns.rcode.NXDOMAIN
            assert reply.authority and reply.authority[0].rdtype == dns.rdatatype.SOA
        assert knot.query_count() == before + 1

    def test_nodata_is_negatively_cached(self, knot, proxy_factory):
        """NODATA (AAAA of an A-only name) is cached with its SOA."""
        proxy = proxy_factory("--upstream", knot.address)
        before = knot.query_count()
        for _ in range(3):
            reply = query(proxy.address, KUBERNETES, "AAAA")
            assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
        assert knot.query_count() == before + 1

    def test_id_case_and_flags(self, knot, proxy_factory):
        """The answer echoes the ID and the question's case, sets RA, never AA."""
        proxy = proxy_factory("--upstream", knot.address)
        for _ in range(2):  # miss, then hot-path hit
            request = dns.message.make_query("KuBeRnEtEs.Default.SVC.cluster.local", "A", use_edns=False)
            request.id = 0xBEEF
            reply = raw_udp(("127.0.0.1", proxy.port), request.to_wire())
            assert reply[:2] == b"\xbe\xef"
            parsed = dns.message.from_wire(reply)
            assert parsed.question[0].name.to_text() == "KuBeRnEtEs.Default.SVC.cluster.local."
            assert reply[12 : 12 + 38] == request.to_wire()[12 : 12 + 38]
            assert parsed.flags & dns.flags.RA and not parsed.flags & dns.flags.AA
            assert parsed.flags & dns.flags.RD

    def test_opt_only_when_asked(self, knot, proxy_factory):
        """An OPT record is in the answer only when the query had one (RFC 6891)."""
        proxy = proxy_factory("--upstream", knot.address)
        assert query(proxy.address, WEB, "A").edns == -1
        with_edns = query(proxy.address, WEB, "A", edns=1232)
        assert with_edns.edns == 0 and with_edns.payload == 1232

    def test_ipv6_listen(self, knot, proxy_factory):
        """--listen [::1]:PORT serves over IPv6 loopback."""
        from servers import free_port

        port = free_port()
        proxy = proxy_factory("--upstream", knot.address, "--listen", f"[::1]:{port}")
        reply = query(f"[::1]:{port}", KUBERNETES, "A")
        assert answer_texts(reply) == ["10.96.0.1"]
        assert proxy.proc.poll() is None


class TestSizeAndTcp:
    """Truncation over UDP, whole answers over TCP, and RFC 7766 framing."""

    def test_large_answer_truncated_without_edns(self, knot, proxy_factory):
        """A >512-byte answer to a query without EDNS gets TC=1; over TCP it comes whole."""
        proxy = proxy_factory("--upstream", knot.address)
        for _ in range(2):  # miss path, then cached path
            udp = query(proxy.address, BIG, "A")
            assert udp.flags & dns.flags.TC and not udp.answer
            tcp = query(proxy.address, BIG, "A", tcp=True)
            assert not tcp.flags & dns.flags.TC
            assert answer_texts(tcp) == sorted(BIG_ADDRESSES)

    def test_large_answer_fits_edns_payload(self, knot, proxy_factory):
        """With EDNS payload 1232 the same answer fits in UDP."""
        proxy = proxy_factory("--upstream", knot.address)
        reply = query(proxy.address, BIG, "A", edns=1232)
        assert not reply.flags & dns.flags.TC and len(answer_texts(reply)) == 60

    def test_dig_retries_truncated_over_tcp(self, knot, proxy_factory):
        """dig without EDNS sees TC=1 and retries over TCP, getting all 60 records."""
        proxy = proxy_factory("--upstream", knot.address)
        out = dig("@127.0.0.1", "-p", str(proxy.port), "+noedns", BIG, "+short")
        assert sorted(out.split()) == sorted(BIG_ADDRESSES)

    def test_fifty_pipelined_queries_on_one_connection(self, knot, proxy_factory):
        """50 queries written at once on one TCP connection are all answered, matched by ID."""
        proxy = proxy_factory("--upstream", knot.address)
        names = [KUBERNETES, WEB, BIG, SRV_NAME, "nope.default.svc.cluster.local"]
        requests = {}
        payload = b""
        for i in range(50):
            request = dns.message.make_query(names[i % len(names)], "A")
            request.id = i + 1
            requests[request.id] = request
            payload += tcp_frame(request.to_wire())
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(payload)
            answered = set()
            for _ in range(50):
                reply = dns.message.from_wire(read_frame(sock))
                assert requests[reply.id].question == reply.question
                answered.add(reply.id)
        assert answered == set(requests)

    def test_query_split_across_segments(self, knot, proxy_factory):
        """A TCP query sent a few bytes at a time is reassembled and answered."""
        proxy = proxy_factory("--upstream", knot.address)
        framed = tcp_frame(dns.message.make_query(KUBERNETES, "A").to_wire())
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(0, len(framed), 3):
                sock.sendall(framed[i : i + 3])
                time.sleep(0.01)
            reply = dns.message.from_wire(read_frame(sock))
        assert answer_texts(reply) == ["10.96.0.1"]

    def test_idle_connection_closed(self, knot, proxy_factory):
        """A TCP connection that sends nothing is closed after --tcp-idle-timeout (RFC 7766 §6.2.3)."""
        proxy = proxy_factory("--upstream", knot.address, "--tcp-idle-timeout", "1")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            started = time.monotonic()
            assert sock.recv(10) == b""
            assert 0.5 < time.monotonic() - started < 4

    def test_tcp_connection_cap(self, knot, proxy_factory):
        """Beyond --max-tcp-connections a new connection is not served until one closes."""
        proxy = proxy_factory("--upstream", knot.address, "--max-tcp-connections", "2")
        framed = tcp_frame(dns.message.make_query(KUBERNETES, "A").to_wire())
        first = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        second = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        first.sendall(framed)
        read_frame(first)
        second.sendall(framed)
        read_frame(second)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=1) as third:
            third.sendall(framed)
            try:
                third.recv(2)
                served_while_full = True
            except TimeoutError:
                served_while_full = False
            first.close()
            third.settimeout(5)
            reply = dns.message.from_wire(read_frame(third))
        second.close()
        assert not served_while_full
        assert answer_texts(reply) == ["10.96.0.1"]
        # UDP is unaffected by full TCP slots.
        assert answer_texts(query(proxy.address, KUBERNETES, "A")) == ["10.96.0.1"]


class TestBadInput:
    """The error ladder: drop, FORMERR, NOTIMP; nothing stops the proxy answering."""

    def test_qr_set_never_answered(self, knot, proxy_factory):
        """A packet with QR=1 gets no answer (no reflection loops)."""
        proxy = proxy_factory("--upstream", knot.address)
        packet = bytearray(dns.message.make_query(KUBERNETES, "A").to_wire())
        packet[2] |= 0x80
        assert raw_udp(("127.0.0.1", proxy.port), bytes(packet), timeout=1) is None

    def test_short_packet_dropped(self, knot, proxy_factory):
        """Fewer bytes than a header get no answer."""
        proxy = proxy_factory("--upstream", knot.address)
        assert raw_udp(("127.0.0.1", proxy.port), b"\x12\x34\x01", timeout=1) is None

    def test_qdcount_zero_gets_formerr(self, knot, proxy_factory):
        """A header-only query (QDCOUNT 0) gets FORMERR with the same ID."""
        proxy = proxy_factory("--upstream", knot.address)
        reply = raw_udp(("127.0.0.1", proxy.port), b"\x12\x34\x01\x00" + b"\x00" * 8)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0xF == dns.rcode.FORMERR

    def test_notify_gets_notimp(self, knot, proxy_factory):
        """An opcode other than QUERY (here NOTIFY) gets NOTIMP."""
        proxy = proxy_factory("--upstream", knot.address)
        packet = bytearray(dns.message.make_query(KUBERNETES, "SOA").to_wire())
        packet[2] = (packet[2] & 0x87) | (4 << 3)
        reply = raw_udp(("127.0.0.1", proxy.port), bytes(packet))
        assert reply[3] & 0xF == dns.rcode.NOTIMP

    def test_ten_thousand_random_and_mutated_packets(self, knot, proxy_factory):
        """10,000 random and mutated packets neither stop the proxy nor get QR=1 packets answered."""
        proxy = proxy_factory("--upstream", knot.address)
        rng = random.Random(1234)
        seed = dns.message.make_query(KUBERNETES, "A", use_edns=0).to_wire()
        answered_qr = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            deadline = time.monotonic() + 60
            for i in range(10_000):
                if i % 2:
                    packet = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
                else:
                    packet = bytearray(seed)
                    for _ in range(rng.randint(1, 6)):
                        packet[rng.randrange(len(packet))] = rng.getrandbits(8)
                    packet = bytes(packet[: rng.randint(1, len(packet))])
                try:
                    sock.sendto(packet, ("127.0.0.1", proxy.port))
                except BlockingIOError:
                    pass
                if i % 200 == 0:
                    time.sleep(0.005)  # let the proxy drain its socket buffer
                assert time.monotonic() < deadline
            time.sleep(0.5)
            while True:
                try:
                    reply = sock.recv(65535)
                except BlockingIOError:
                    break
                # Every answer must have been to a query (QR=0) and must parse as a message header.
                assert len(reply) >= 12 and reply[2] & 0x80
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as qr_sock:
            qr_sock.settimeout(0.5)
            for _ in range(100):
                packet = bytearray(rng.getrandbits(8) for _ in range(40))
                packet[2] |= 0x80
                qr_sock.sendto(bytes(packet), ("127.0.0.1", proxy.port))
            try:
                qr_sock.recv(65535)
                answered_qr += 1
            except TimeoutError:
                pass
        assert answered_qr == 0
        assert answer_texts(query(proxy.address, KUBERNETES, "A")) == ["10.96.0.1"]
        assert proxy.proc.poll() is None
