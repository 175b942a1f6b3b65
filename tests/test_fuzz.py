"""Property tests (hypothesis): hostile client packets and hostile upstream replies never break the proxy.

In-process tests drive wire.parse_query, wire.error_response and cache.entry_from_reply with random
and mutated packets; the others send such packets to a running proxy over real UDP and TCP, or make
a scripted upstream answer the proxy with them. Every input that once broke an invariant stays here
as an explicit example.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cache
import wire
from conftest import query
from servers import free_port

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
POLICY = cache.TtlPolicy()
# In-process properties are cheap; the networked ones pay a round trip per example.
PURE = settings(max_examples=400, deadline=None, database=None)
NETWORK = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
FAST = ("--upstream-timeout", "0.4", "--deadline", "0.8", "--failure-recheck", "0.5")


# --- packet strategies -----------------------------------------------------------------------


def encode_name(labels: list[bytes]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


@st.composite
def names(draw) -> bytes:
    """A name in wire form, mostly well-formed, sometimes hostile (RFC 1035 §4.1.4, RFC 6891 §5)."""
    kind = draw(st.sampled_from(["plain"] * 6 + ["long", "pointer", "loop", "bad_label", "overrun", "root"]))
    if kind == "plain":
        return encode_name(draw(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=5)))
    if kind == "long":  # over 255 octets (RFC 1035 §2.3.4)
        return encode_name([b"a" * 63] * draw(st.integers(4, 6)))
    if kind == "pointer":
        return encode_name(draw(st.lists(st.binary(min_size=1, max_size=8), max_size=2)))[:-1] + b"\xc0\x0c"
    if kind == "loop":  # a pointer to itself, or two pointers to each other
        return draw(st.sampled_from([b"\xc0\x0c", b"\xc0\x0e\xc0\x0c", b"\x01a\xc0\x0c"]))
    if kind == "bad_label":  # label types 01 and 10 are reserved or obsolete (RFC 6891 §5)
        return bytes((draw(st.integers(0x40, 0xBF)),)) + draw(st.binary(max_size=8))
    if kind == "overrun":
        return bytes((draw(st.integers(1, 63)),)) + draw(st.binary(max_size=4))
    return b"\x00"


@st.composite
def opt_records(draw) -> bytes:
    """An OPT pseudo-record with any payload, extended rcode, version, DO bit and options (RFC 6891 §6.1.2)."""
    options = draw(st.binary(max_size=12))
    ttl = (draw(st.integers(0, 255)) << 24) | (draw(st.sampled_from([0, 0, 0, 1, 255])) << 16)
    ttl |= 0x8000 if draw(st.booleans()) else 0
    rdlength = draw(st.one_of(st.just(len(options)), st.integers(0, 0xFFFF)))
    owner = draw(st.sampled_from([b"\x00", b"\x00", b"\x01a\x00", b"\xc0\x0c"]))
    return owner + _RR.pack(41, draw(st.integers(0, 0xFFFF)), ttl, rdlength) + options


@st.composite
def records(draw) -> bytes:
    """A resource record, usually owned by the question name (c00c), with honest or lying rdlength."""
    owner = draw(st.one_of(st.just(b"\xc0\x0c"), names()))
    rtype = draw(st.sampled_from([1, 1, 1, 28, 5, 6, 2, 16, 33, 41, 46, 47, 255, 0, 65535]))
    if rtype == 1:
        rdata = draw(st.binary(min_size=4, max_size=4))
    elif rtype == 28:
        rdata = draw(st.binary(min_size=16, max_size=16))
    elif rtype == 6:
        rdata = b"\x00\x00" + draw(st.binary(min_size=20, max_size=20))
    elif rtype in (5, 2):
        rdata = draw(st.one_of(st.just(b"\xc0\x0c"), names()))
    else:
        rdata = draw(st.binary(max_size=24))
    rdlength = draw(st.one_of(st.just(len(rdata)), st.just(len(rdata)), st.integers(0, 0xFFFF)))
    ttl = draw(st.sampled_from([0, 1, 30, 300, 86400, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]))
    return owner + _RR.pack(rtype, draw(st.sampled_from([1, 1, 3, 254, 255])), ttl, rdlength) + rdata


@st.composite
def query_packets(draw) -> bytes:
    """A client query: any opcode, QR, QDCOUNT 0..n, questions with hostile names, OPT and other additionals."""
    opcode = draw(st.sampled_from([0] * 8 + list(range(1, 16))))
    flags = (opcode << 11) | (draw(st.integers(0, 0xFFFF)) & 0x07FF)
    if draw(st.integers(0, 7)) == 0:
        flags |= 0x8000
    questions = [
        draw(names()) + struct.pack("!HH", draw(st.integers(0, 0xFFFF)), draw(st.sampled_from([1, 1, 3, 254, 255])))
        for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2, 3])))
    ]
    additional = draw(st.lists(st.one_of(opt_records(), records()), max_size=3))
    answers = [draw(records())] if draw(st.integers(0, 9)) == 0 else []
    counts = [len(questions), len(answers), 0, len(additional)]
    if draw(st.integers(0, 4)) == 0:
        counts[draw(st.integers(0, 3))] = draw(st.integers(0, 0xFFFF))
    body = b"".join(questions) + b"".join(answers) + b"".join(additional)
    return _HEADER.pack(draw(st.integers(0, 0xFFFF)), flags, *counts) + body


@st.composite
def reply_packets(draw) -> bytes:
    """An upstream reply: QR=1, any rcode, answers, authority SOA, OPT anywhere among the additionals."""
    question = encode_name(draw(st.lists(st.binary(min_size=1, max_size=20), max_size=4)))
    question += struct.pack("!HH", draw(st.sampled_from([1, 28, 5, 33, 16])), 1)
    flags = 0x8000 | (draw(st.integers(0, 0x7FFF)) & ~(0x7800 if draw(st.booleans()) else 0))
    answers = draw(st.lists(records(), max_size=4))
    authority = draw(st.lists(records(), max_size=2))
    additional = draw(st.lists(records(), max_size=2))
    if draw(st.booleans()):
        additional.insert(draw(st.integers(0, len(additional))), draw(opt_records()))
    counts = [1, len(answers), len(authority), len(additional)]
    if draw(st.integers(0, 5)) == 0:
        counts[draw(st.integers(0, 3))] = draw(st.integers(0, 0xFFFF))
    body = question + b"".join(answers + authority + additional)
    return _HEADER.pack(draw(st.integers(0, 0xFFFF)), flags, *counts) + body


@st.composite
def mutated(draw, base: st.SearchStrategy[bytes], keep: int = 0) -> bytes:
    """A packet from base with a few byte-level mutations after its first `keep` bytes."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "u16"]))
        if len(data) <= keep:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(keep, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x3F, 0x40, 0x80, 0xC0, 0x0C, 0xFF]))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at : at + 2] = struct.pack("!H", draw(st.sampled_from([0, 1, 41, 0xC00C, 0xC000, 0xFFFF])))
    return bytes(data)


any_query = st.one_of(st.binary(max_size=300), query_packets(), mutated(query_packets()))
any_reply = st.one_of(st.binary(max_size=300), reply_packets(), mutated(reply_packets()))


# --- invariants --------------------------------------------------------------------------------


def parses(message: bytes) -> dns.message.Message:
    """dnspython's reading of an answer; failing to parse breaks the invariant."""
    try:
        return dns.message.from_wire(message)
    except dns.exception.DNSException as exc:
        raise AssertionError(f"answer does not parse ({exc!r}): {message.hex()}") from None


def dnspython_accepts(message: bytes) -> bool:
    try:
        dns.message.from_wire(message)
    except Exception:  # any failure means dnspython is no reference for this message
        return False
    return True


def points_into_header(message: bytes) -> bool:
    """True if any two bytes after the header could be a compression pointer into the header.

    The proxy rewrites ID, flags and counts; a bogus pointer there (never legal, RFC 1035 §4.1.4)
    reads them as a name, so such replies are no reference for "the proxy kept it parseable".
    """
    return any(
        message[i] >= 0xC0 and ((message[i] & 0x3F) << 8 | message[i + 1]) < 12 for i in range(12, len(message) - 1)
    )


def check_parse_query(data: bytes) -> None:
    """parse_query raises only DropQuery or BadQuery; a returned Query agrees with the bytes; errors answer well."""
    try:
        parsed = wire.parse_query(data)
    except wire.DropQuery:
        assert len(data) < 12 or data[2] & 0x80, "dropped a packet with a header and QR=0"
        return
    except wire.BadQuery as exc:
        assert len(data) >= 12 and not data[2] & 0x80, "an error answer to a packet that must be dropped"
        assert exc.rcode in (wire.FORMERR, wire.NOTIMP, wire.BADVERS)
        answer = wire.error_response(data, exc.rcode, exc.query)
        message = parses(answer)
        assert answer[:2] == data[:2] and message.flags & dns.flags.QR
        assert message.rcode() == exc.rcode
        return
    assert parsed.wire is data
    assert len(data) >= 12 and not data[2] & 0x80 and (parsed.flags >> 11) & 0xF == 0
    question = parsed.question
    assert data[12 : 12 + len(question)] == question and question[-5] == 0
    assert len(question) - 4 <= 255
    assert struct.unpack("!HH", question[-4:]) == (parsed.qtype, parsed.qclass)
    flag_byte = (wire.KEY_DO if parsed.do else 0) | (wire.KEY_CD if parsed.cd else 0)
    assert parsed.key == question[:-4].lower() + question[-4:] + bytes((flag_byte,))
    assert parsed.cd == bool(parsed.flags & wire.FLAG_CD)
    assert parsed.edns or (not parsed.do and parsed.max_udp == 512)
    assert 512 <= parsed.max_udp <= 65535
    assert parsed.qname.endswith(".")


def client_query_for(reply: bytes, edns: bool) -> wire.Query | None:
    """The client query asking exactly the question of an upstream reply, or None if no client could ask it."""
    question = reply[12 : wire.question_end(reply)]
    opt = b"\x00" + _RR.pack(41, 1232, 0, 0) if edns else b""
    try:
        return wire.parse_query(_HEADER.pack(0xBEEF, 0x0100, 1, 0, 0, 1 if edns else 0) + question + opt)
    except wire.BadQuery:
        return None  # a name over 255 octets


def check_entry_from_reply(data: bytes) -> None:
    """entry_from_reply raises only WireError; a returned entry renders with QR=1, the client's ID and question."""
    try:
        entry, cacheable = cache.entry_from_reply(data, POLICY, 100.0)
    except wire.WireError:
        return
    if cacheable:
        assert entry.rcode in (wire.NOERROR, wire.NXDOMAIN) and not data[2] & 0x02
        assert 0 <= entry.ttl <= POLICY.max_ttl
    for edns in (False, True):
        client = client_query_for(data, edns)
        if client is None:
            continue
        for max_size in (512, 65535):
            answer = entry.render(client, 7, max_size)
            assert answer[:2] == b"\xbe\xef" and answer[2] & 0x80, "answer lost the client's ID or QR"
            assert len(answer) <= max_size
            assert answer[12 : 12 + len(client.question)] == client.question
            wire.scan_reply(answer)  # the proxy's own structure check holds for what it sends
            if points_into_header(data) or not dnspython_accepts(data):
                continue
            # The proxy must not break a reply a client could parse.
            message = parses(answer)
            assert (message.edns >= 0) == edns, "OPT in the answer differs from the client's query"
            assert not message.flags & dns.flags.AA
            if cacheable and not answer[2] & 0x02:
                assert all(rrset.ttl == 7 for rrset in message.answer + message.authority)


# --- in-process properties ----------------------------------------------------------------------


@PURE
@given(st.binary(max_size=600))
@example(b"")
@example(b"\x00" * 11)
@example(b"\x00" * 12)
def test_parse_query_random_bytes(data):
    """Random bytes as a query raise only DropQuery or BadQuery, and error answers parse."""
    check_parse_query(data)


@PURE
@given(query_packets())
def test_parse_query_structured(data):
    """Queries with any opcode, QDCOUNT, hostile names and odd OPTs keep parse_query's contract."""
    check_parse_query(data)


@PURE
@given(mutated(query_packets()))
def test_parse_query_mutated(data):
    """Byte-level mutations of queries keep parse_query's contract."""
    check_parse_query(data)


@pytest.mark.parametrize("size", [0, 1, 2, 11, 12, 13, 17, 512, 8192, 65535, 70000])
@pytest.mark.parametrize("fill", [0x00, 0x01, 0x3F, 0xC0, 0xFF])
def test_parse_query_tiny_and_huge(size, fill):
    """Packets from empty to beyond 64 KiB, filled with one byte, keep parse_query's contract."""
    check_parse_query(bytes([fill]) * size)


@pytest.mark.parametrize("opcode", range(16))
def test_every_opcode(opcode):
    """Every opcode but QUERY gets NOTIMP, QUERY a parsed question (RFC 1035 §4.1.1)."""
    data = _HEADER.pack(7, (opcode << 11) | 0x0100, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01"
    check_parse_query(data)
    if opcode:
        with pytest.raises(wire.BadQuery) as caught:
            wire.parse_query(data)
        assert caught.value.rcode == wire.NOTIMP
    else:
        assert wire.parse_query(data).qtype == 1


@pytest.mark.parametrize("qdcount", [0, 1, 2, 3, 0xFFFF])
def test_qdcount_zero_to_many(qdcount):
    """Only QDCOUNT 1 is resolved; any other count gets FORMERR (RFC 9619)."""
    data = _HEADER.pack(7, 0x0100, qdcount, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01" * max(1, min(qdcount, 3))
    check_parse_query(data)
    if qdcount != 1:
        with pytest.raises(wire.BadQuery) as caught:
            wire.parse_query(data)
        assert caught.value.rcode == wire.FORMERR


@PURE
@given(st.binary(min_size=12, max_size=300), st.sampled_from([0, 1, 2, 3, 4, 5, 16]))
def test_error_response_of_any_packet_parses(data, rcode):
    """An error answer built from any 12+ bytes parses, with the packet's ID, QR=1 and the rcode."""
    answer = wire.error_response(data, rcode)
    message = parses(answer)
    assert answer[:2] == data[:2] and message.flags & dns.flags.QR
    assert message.rcode() == rcode & 0xF  # without OPT only the low four bits travel


@PURE
@given(st.binary(max_size=600))
@example(bytes.fromhex("1234818000010001000000000161016200001c0001c000020100010000012c0004c0000201"))
@example(
    bytes.fromhex(
        "1234818000010003000000010000020001c00bfe0100010000012c0004c0000201c00c000100010000012c0004c00002"
        "010100c00c000100010000012c0004c00002010003d7fb2f290000000000"
    )
)
def test_entry_from_reply_random_bytes(data):
    """Random upstream bytes raise only WireError; a returned entry renders to a sane answer."""
    check_entry_from_reply(data)


@PURE
@given(reply_packets())
def test_entry_from_reply_structured(data):
    """Replies with any rcode, lying counts, odd TTLs and OPT placement keep entry_from_reply's contract."""
    check_entry_from_reply(data)


@PURE
@given(mutated(reply_packets(), keep=12))
def test_entry_from_reply_mutated(data):
    """Byte-level mutations of replies keep entry_from_reply's contract."""
    check_entry_from_reply(data)


def test_upstream_opt_before_other_additional_records_not_forwarded():
    """An upstream OPT followed by another additional record is not passed on: clients get at most one OPT."""
    # Found by fuzzing (a bug, failing until fixed): entry_from_reply keeps such an OPT (it cannot
    # cut it off) and render() appends ours, so an EDNS client gets two OPT records (RFC 6891
    # §6.1.1: FORMERR; dnspython refuses the message) and a plain client one it never asked for (§7).
    question = b"\x01a\x00\x00\x01\x00\x01"
    answer = b"\xc0\x0c" + _RR.pack(1, 1, 300, 4) + bytes(4)
    opt = b"\x00" + _RR.pack(41, 1232, 0, 0)
    reply = _HEADER.pack(0x1234, 0x8180, 1, 1, 0, 2) + question + answer + opt + answer
    entry, _ = cache.entry_from_reply(reply, POLICY, 100.0)
    for edns in (False, True):
        message = parses(entry.render(client_query_for(reply, edns), 7, 65535))
        assert (message.edns >= 0) == edns


def test_upstream_extended_rcode_not_answered_as_noerror():
    """An upstream reply whose OPT carries an extended rcode (BADVERS, 16) does not reach the client as NOERROR."""
    # A bug, failing until fixed: entry_from_reply drops the OPT and with it the upper rcode bits
    # (RFC 6891 §6.1.3), so the low bits, 0, read as NOERROR with an empty answer: NODATA.
    question = b"\x01a\x00\x00\x01\x00\x01"
    opt = b"\x00" + _RR.pack(41, 1232, 1 << 24, 0)
    reply = _HEADER.pack(0x1234, 0x8180, 1, 0, 0, 1) + question + opt
    entry, cacheable = cache.entry_from_reply(reply, POLICY, 100.0)
    assert not cacheable
    message = parses(entry.render(client_query_for(reply, True), 7, 65535))
    assert message.rcode() != dns.rcode.NOERROR


# --- against a running proxy ------------------------------------------------------------------


def question_end(message: bytes) -> int | None:
    """Offset past the first question (uncompressed name), or None; the scripted upstream's own walk."""
    pos = 12
    while pos < len(message) and 0 < message[pos] < 64:
        pos += message[pos] + 1
    if pos >= len(message) or message[pos] != 0 or pos + 5 > len(message):
        return None
    return pos + 5


def plain_answer(query_wire: bytes) -> bytes | None:
    """A NOERROR reply with one A record (192.0.2.1, TTL 30) for whatever question the query asks."""
    end = question_end(query_wire)
    if end is None or len(query_wire) < 12:
        return None
    record = b"\xc0\x0c" + _RR.pack(1, 1, 30, 4) + bytes((192, 0, 2, 1))
    return query_wire[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, 1, 0, 0) + query_wire[12:end] + record


class ScriptedUpstream:
    """A DNS server on 127.0.0.1 (UDP and TCP, stdlib sockets in a thread) whose replies come from `make_reply`."""

    def __init__(self, make_reply: Callable[[bytes], bytes | None] = plain_answer) -> None:
        self.make_reply = make_reply
        self.port = free_port()
        self.sent: list[bytes] = []
        self._stop = threading.Event()
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind(("127.0.0.1", self.port))
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind(("127.0.0.1", self.port))
        self._tcp.listen(16)
        self._thread = threading.Thread(target=self._serve, name="scripted-upstream", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._udp.close()
        self._tcp.close()

    def _reply(self, query_wire: bytes) -> bytes | None:
        reply = self.make_reply(query_wire)
        if reply is not None:
            self.sent.append(reply)
        return reply

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ)
            selector.register(self._tcp, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    with contextlib.suppress(OSError):
                        if key.fileobj is self._udp:
                            data, client = self._udp.recvfrom(65535)
                            reply = self._reply(data)
                            if reply is not None:
                                self._udp.sendto(reply, client)
                        else:
                            conn, _ = self._tcp.accept()
                            with conn:
                                self._serve_tcp(conn)

    def _serve_tcp(self, conn: socket.socket) -> None:
        """One query per connection, as the proxy's upstream side sends them (RFC 7766 §8 framing)."""
        conn.settimeout(1.0)
        header = conn.recv(2, socket.MSG_WAITALL)
        if len(header) != 2:
            return
        data = conn.recv(struct.unpack("!H", header)[0], socket.MSG_WAITALL)
        reply = self._reply(data)
        if reply is not None:
            conn.sendall(struct.pack("!H", len(reply)) + reply[:65535])


def client_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def with_ids(packets: list[bytes], base: int) -> dict[bytes, bytes]:
    """The packets keyed by a unique ID written into their first two bytes (packets under 2 bytes keep theirs)."""
    out: dict[bytes, bytes] = {}
    for index, packet in enumerate(packets):
        if len(packet) >= 2:
            qid = struct.pack("!H", (base + index) & 0xFFFF)
            packet = qid + packet[2:]
            out[qid] = packet
        else:
            out[b"short-%d" % index] = packet
    return out


def check_answers(sent: dict[bytes, bytes], answers: list[bytes]) -> None:
    """Each packet with a header and QR=0 gets exactly one answer that parses and echoes its ID; others get none."""
    expected = {qid for qid, packet in sent.items() if len(packet) >= 12 and not packet[2] & 0x80}
    seen: list[bytes] = []
    for answer in answers:
        qid = answer[:2]
        assert qid in expected, f"answer to a packet that must be dropped: {sent.get(qid, b'').hex()}"
        assert answer[2] & 0x80, "answer without QR=1"
        parses(answer)
        seen.append(qid)
    assert len(seen) == len(set(seen)), "a packet was answered twice"
    missing = expected - set(seen)
    assert not missing, f"no answer to {[sent[qid].hex() for qid in missing]}"


def assert_still_serving(proxy) -> None:
    """The proxy runs, answers a normal query, and logged no traceback or handler failure."""
    assert proxy.proc.poll() is None, f"proxy exited: {proxy.stderr()}"
    assert query(proxy.address, "normal.example.test").rcode() == dns.rcode.NOERROR
    assert "Traceback" not in proxy.stdout() + proxy.stderr()
    failures = [e for e in proxy.logs() if e.get("event", "").endswith("_failed")]
    assert not failures, failures


junk_batches = st.lists(st.one_of(any_query, mutated(query_packets(), keep=2)), min_size=1, max_size=16)


def udp_exchange(port: int, sent: dict[bytes, bytes]) -> list[bytes]:
    """Send every packet from one socket and collect answers until all expected came and 0.2 s passed quietly."""
    expected = sum(1 for p in sent.values() if len(p) >= 12 and not p[2] & 0x80)
    answers: list[bytes] = []
    with client_socket() as sock:
        for packet in sent.values():
            sock.sendto(packet, ("127.0.0.1", port))
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            sock.settimeout(max(0.01, min(end - time.monotonic(), 0.1 if len(answers) >= expected else 2.0)))
            try:
                answers.append(sock.recv(65535))
            except TimeoutError:
                if len(answers) >= expected:
                    break
    return answers


def tcp_exchange(port: int, sent: dict[bytes, bytes]) -> list[bytes]:
    """Send every packet framed on one connection (RFC 7766 §8) and collect the framed answers likewise."""
    expected = sum(1 for p in sent.values() if len(p) >= 12 and not p[2] & 0x80)
    answers: list[bytes] = []
    buffer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
        sock.sendall(b"".join(struct.pack("!H", len(p)) + p for p in sent.values()))
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            sock.settimeout(max(0.01, min(end - time.monotonic(), 0.1 if len(answers) >= expected else 2.0)))
            try:
                chunk = sock.recv(65535)
            except TimeoutError:
                if len(answers) >= expected:
                    break
                continue
            if not chunk:
                break
            buffer += chunk
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack_from("!H", buffer)[0]:
                length = struct.unpack_from("!H", buffer)[0]
                answers.append(buffer[2 : 2 + length])
                buffer = buffer[2 + length :]
    return answers


@pytest.fixture
def scripted_proxy(proxy_factory):
    """A scripted upstream (one A record for any question) and a proxy in front of it."""
    with ScriptedUpstream() as upstream:
        yield upstream, proxy_factory("--upstream", upstream.address, *FAST)


def test_proxy_udp_junk(scripted_proxy):
    """Over UDP, hostile packets get one parseable answer echoing their ID if they have a header and QR=0, else none."""
    _, proxy = scripted_proxy

    @NETWORK
    @given(packets=junk_batches)
    @example(packets=[b"\x00" * 8192 + b"\x01" * 100])  # beyond the 8192 bytes read per datagram
    @example(packets=[_HEADER.pack(1, 0x8000, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01"])
    def run(packets):
        sent = with_ids(packets, base=time.monotonic_ns() // 1000)
        check_answers(sent, udp_exchange(proxy.port, sent))

    run()
    assert_still_serving(proxy)


def test_proxy_tcp_junk(scripted_proxy):
    """Over TCP, hostile messages on one connection get one parseable answer each if they have a header and QR=0."""
    _, proxy = scripted_proxy

    @NETWORK
    @given(packets=junk_batches)
    @example(packets=[b"\x00\x01" + b"\x00" * 65533])  # the largest TCP message
    def run(packets):
        # A zero-length message ends the connection, so it is left out here.
        sent = with_ids([p for p in packets if p], base=time.monotonic_ns() // 1000)
        check_answers(sent, tcp_exchange(proxy.port, sent))

    run()
    assert_still_serving(proxy)


def test_proxy_still_serving_after_junk(scripted_proxy):
    """After every opcode, compression loops, tiny and empty packets over UDP and TCP, the proxy serves normally."""
    _, proxy = scripted_proxy
    junk = [b"", b"\x00", b"\xff" * 12, b"\x00" * 12, b"\xc0\x0c" * 300]
    junk += [_HEADER.pack(i, i << 11, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01" for i in range(16)]
    with client_socket() as sock:
        for packet in junk:
            sock.sendto(packet, ("127.0.0.1", proxy.port))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2.0) as sock:
        sock.sendall(b"".join(struct.pack("!H", len(p)) + p for p in junk if p) + b"\x00\x00")
        sock.settimeout(2.0)
        while sock.recv(65535):  # the zero-length message at the end closes the connection
            pass
    assert_still_serving(proxy)


# --- hostile upstream replies ---------------------------------------------------------------------


@st.composite
def evil_reply_makers(draw) -> tuple[int, int, int, int, bytes]:
    """How the scripted upstream answers: flags (QR=1), counts and the bytes after the question."""
    flags = 0x8000 | (draw(st.integers(0, 0x7FFF)) & ~(0x7800 if draw(st.booleans()) else 0))
    if draw(st.integers(0, 3)):
        flags &= ~0x0200  # TC=1 only sometimes: it sends the proxy over TCP
    kind = draw(st.sampled_from(["records", "records", "random", "mutated"]))
    if kind == "random":
        body = draw(st.binary(max_size=200))
        counts = [draw(st.integers(0, 4)) for _ in range(3)]
    else:
        answers = draw(st.lists(records(), max_size=4))
        authority = draw(st.lists(records(), max_size=2))
        additional = draw(st.lists(st.one_of(records(), opt_records()), max_size=2))
        body = b"".join(answers + authority + additional)
        counts = [len(answers), len(authority), len(additional)]
        if kind == "mutated" and body:
            body = draw(mutated(st.just(body)))
    return (flags, *counts, body)


def evil_reply(query_wire: bytes, maker: tuple[int, int, int, int, bytes]) -> bytes | None:
    """The reply the scripted upstream sends: the query's ID and question, then the drawn header and body."""
    end = question_end(query_wire)
    if end is None:
        return None
    flags, ancount, nscount, arcount, body = maker
    return query_wire[:2] + _HEADER.pack(0, flags, 1, ancount, nscount, arcount)[2:] + query_wire[12:end] + body


A_RECORD = b"\xc0\x0c" + _RR.pack(1, 1, 30, 4) + bytes(4)


@pytest.mark.parametrize("use_edns", [False, True], ids=["plain", "edns"])
def test_hostile_upstream_replies(scripted_proxy, use_edns):
    """Whatever an upstream sends with the right ID and question, the client gets an answer in time, parseable
    by dnspython whenever the upstream's reply was (an unparseable one may pass on as it came: wire-form cache).
    """
    upstream, proxy = scripted_proxy
    passed_through = []

    @NETWORK
    @given(maker=evil_reply_makers(), qtype=st.sampled_from(["A", "AAAA", "TXT", "MX", "SRV", "PTR", "ANY"]))
    @example(maker=(0x8180, 1, 0, 0, A_RECORD), qtype="A")
    @example(maker=(0x8380, 1, 0, 0, A_RECORD), qtype="A")  # TC=1: over TCP, TC=1 again
    def run(maker, qtype):
        upstream.make_reply = lambda query_wire: evil_reply(query_wire, maker)
        upstream.sent.clear()
        message = dns.message.make_query(f"q{time.monotonic_ns()}.evil.test.", qtype, use_edns=0 if use_edns else False)
        started = time.monotonic()
        with client_socket() as sock:
            sock.settimeout(3.0)
            sock.sendto(message.to_wire(), ("127.0.0.1", proxy.port))
            answer = sock.recv(65535)  # a TimeoutError here is silence: a broken invariant
        assert time.monotonic() - started < 0.8 + 0.5, "answer came after the deadline"
        assert answer[:2] == message.to_wire()[:2] and answer[2] & 0x80
        reply = upstream.sent[-1] if upstream.sent else b""
        if dnspython_accepts(reply) and not points_into_header(reply):
            parses(answer)
        elif not dnspython_accepts(answer):
            passed_through.append(reply)

    run()
    upstream.make_reply = plain_answer
    assert_still_serving(proxy)
    print(f"unparseable upstream replies passed on unparseable: {len(passed_through)}")
