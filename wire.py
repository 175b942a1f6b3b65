"""DNS wire format at the byte level: the query walk of the hot path, the reply scan, and small built answers.

dnslib is the project's general wire-format library (tests, odd records); the functions here exist
because a cache hit must not pay for a full parse and pack. Longer than most modules because every
byte layout the proxy reads or writes is here, down to the answers autopath makes (cname_answer).
"""

from __future__ import annotations

import struct

# RCODEs (RFC 1035 §4.1.1, RFC 6891 §9 for the extended BADVERS).
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16

QTYPE_CNAME = 5
QTYPE_SOA = 6
QTYPE_OPT = 41
QTYPE_NS = 2

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_AD = 0x0020
FLAG_CD = 0x0010

KEY_DO = 2
KEY_CD = 1
KEY_RAW = 4  # the upstream's own answer for a name whose plain key holds what autopath answers (autopath.py)

MAX_UDP_NO_EDNS = 512  # RFC 1035 §2.3.4
OUR_EDNS_PAYLOAD = 1232  # DNS flag day 2020; also what we advertise upstream (RFC 6891 §6.2.5)
EDE_OPTION = 15  # Extended DNS Errors (RFC 8914)
EDE_STALE_ANSWER = 3
EDE_NO_REACHABLE_AUTHORITY = 22

_HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
_U16X2 = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength


class WireError(ValueError):
    """A message is malformed: a name or record runs past the end, or a count does not fit."""


class DropQuery(Exception):
    """The packet must not be answered at all (too short for a header, or QR=1: RFC 5452 reflection)."""


class BadQuery(Exception):
    """The query is answered with an error rcode and nothing else."""

    def __init__(self, rcode: int, reason: str, query: Query | None = None) -> None:
        super().__init__(reason)
        self.rcode = rcode
        self.reason = reason
        self.query = query  # set when the question was readable, so the answer can echo it


class Query:
    """What the proxy needs of a client query; `question` keeps the client's case, `key` is case-folded."""

    __slots__ = (
        "wire",
        "flags",
        "question",
        "qtype",
        "qclass",
        "key",
        "edns",
        "do",
        "cd",
        "max_udp",
    )

    def __init__(
        self,
        wire: bytes,
        flags: int,
        question: bytes,
        qtype: int,
        qclass: int,
        key: bytes,
        edns: bool,
        do: bool,
        cd: bool,
        max_udp: int,
    ) -> None:
        self.wire = wire
        self.flags = flags
        self.question = question
        self.qtype = qtype
        self.qclass = qclass
        self.key = key
        self.edns = edns
        self.do = do
        self.cd = cd
        self.max_udp = max_udp

    @property
    def qname(self) -> str:
        """The query name as text, case as asked; for logs and the control interface."""
        return name_to_text(self.question, 0)


def skip_name(wire: bytes, pos: int) -> int:
    """Return the offset just past the (possibly compressed) name at pos; raise WireError if it overruns."""
    n = len(wire)
    while True:
        if pos >= n:
            raise WireError("name runs past the end")
        length = wire[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > n:
                raise WireError("pointer runs past the end")
            return pos + 2
        if length & 0xC0:
            raise WireError("unknown label type")
        pos += length + 1


def name_to_text(wire: bytes, pos: int, max_jumps: int = 64) -> str:
    """Decode the name at pos to dotted text, following pointers with a bound (compression loops)."""
    labels: list[str] = []
    jumps = 0
    n = len(wire)
    while True:
        if pos >= n:
            raise WireError("name runs past the end")
        length = wire[pos]
        if length == 0:
            break
        if length & 0xC0 == 0xC0:
            if pos + 2 > n or jumps >= max_jumps:
                raise WireError("bad compression pointer")
            pos = ((length & 0x3F) << 8) | wire[pos + 1]
            jumps += 1
            continue
        if length & 0xC0:
            raise WireError("unknown label type")
        labels.append(wire[pos + 1 : pos + 1 + length].decode("ascii", "backslashreplace"))
        pos += length + 1
    return ".".join(labels) + "."


def parse_query(wire: bytes) -> Query:
    """Walk a client query once: header, one question, and the OPT record if any.

    Raises DropQuery for packets that get no answer and BadQuery for those answered with an rcode.
    """
    n = len(wire)
    if n < 12:
        raise DropQuery("shorter than a header")
    flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire, 0)[1:6]
    if flags & FLAG_QR:
        raise DropQuery("QR=1")
    if (flags >> 11) & 0xF != 0:
        raise BadQuery(NOTIMP, "opcode not QUERY")
    if qdcount != 1:
        raise BadQuery(FORMERR, "QDCOUNT is not 1")
    if ancount or nscount:
        raise BadQuery(FORMERR, "records in answer or authority of a query")
    pos = 12
    while True:
        if pos >= n:
            raise BadQuery(FORMERR, "question runs past the end")
        length = wire[pos]
        if length == 0:
            break
        if length > 63:
            # Compression or extended labels in a question: legal in theory, never sent by real clients.
            raise BadQuery(FORMERR, "compressed or bad label in question")
        pos += length + 1
    qend = pos + 5
    if qend > n:
        raise BadQuery(FORMERR, "question runs past the end")
    if pos - 12 > 254:
        raise BadQuery(FORMERR, "name longer than 255 octets")
    qtype, qclass = _U16X2.unpack_from(wire, pos + 1)
    question = wire[12:qend]
    edns = do = False
    edns_version = 0
    max_udp = MAX_UDP_NO_EDNS
    pos = qend
    for _ in range(arcount):
        try:
            name_end = skip_name(wire, pos)
        except WireError:
            raise BadQuery(FORMERR, "additional record runs past the end") from None
        if name_end + 10 > n:
            raise BadQuery(FORMERR, "additional record runs past the end")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, name_end)
        end = name_end + 10 + rdlength
        if end > n:
            raise BadQuery(FORMERR, "additional record runs past the end")
        if rtype == QTYPE_OPT:
            if edns or name_end != pos + 1:
                raise BadQuery(FORMERR, "more than one OPT, or OPT not owned by the root")  # RFC 6891 §6.1.1
            edns = True
            edns_version = (ttl >> 16) & 0xFF
            do = bool(ttl & 0x8000)
            max_udp = max(MAX_UDP_NO_EDNS, rclass)  # below 512 is treated as 512 (RFC 6891 §6.2.5)
        pos = end
    cd = bool(flags & FLAG_CD)
    key = cache_key(question, do, cd)
    query = Query(wire, flags, question, qtype, qclass, key, edns, do, cd, max_udp)
    if edns_version:
        raise BadQuery(BADVERS, "EDNS version not 0", query)  # RFC 6891 §6.1.3
    return query


def opt_record(do: bool, ede_code: int | None = None, ext_rcode: int = 0) -> bytes:
    """Our OPT pseudo-record: payload 1232, the client's DO bit echoed, and an optional Extended DNS Error."""
    options = b""
    if ede_code is not None:
        options = _U16X2.pack(EDE_OPTION, 2) + _U16.pack(ede_code)
    return (
        b"\x00"
        + _U16X2.pack(QTYPE_OPT, OUR_EDNS_PAYLOAD)
        + _U32.pack((ext_rcode << 24) | (0x8000 if do else 0))
        + _U16.pack(len(options))
        + options
    )


def error_response(query_wire: bytes, rcode: int, query: Query | None = None, ede_code: int | None = None) -> bytes:
    """An answer with no records: the client's ID, opcode, RD and (when parsed) its question and OPT."""
    qid, flags = _U16X2.unpack_from(query_wire, 0)
    out_flags = FLAG_QR | FLAG_RA | (flags & (0x7800 | FLAG_RD | FLAG_CD)) | (rcode & 0xF)
    if query is None:
        return _HEADER.pack(qid, out_flags, 0, 0, 0, 0)
    tail = b""
    if query.edns:
        tail = opt_record(query.do, ede_code, rcode >> 4)
    return _HEADER.pack(qid, out_flags, 1, 0, 0, 1 if tail else 0) + query.question + tail


# A cache key is the question as the client sent it, with the qname lower-cased, then one byte of
# flags that change the answer: DO and CD. Only this module knows the layout.
KEY_TAIL = 5  # qtype, qclass and the flags byte after the qname


def cache_key(question: bytes, do: bool, cd: bool) -> bytes:
    """The cache key of a question (qname in wire form, qtype, qclass): case-folded qname, DO and CD."""
    return question[:-4].lower() + question[-4:] + bytes(((KEY_DO if do else 0) | (KEY_CD if cd else 0),))


def key_qname(key: bytes) -> bytes:
    """The lower-cased qname of a cache key, in wire form."""
    return key[:-KEY_TAIL]


def key_question(key: bytes) -> tuple[int, int]:
    """(qtype, qclass) of a cache key."""
    qtype, qclass = _U16X2.unpack_from(key, len(key) - KEY_TAIL)
    return qtype, qclass


def key_question_wire(key: bytes) -> bytes:
    """The question of a cache key (qname lower-cased, qtype, qclass) in wire form: what a refresh asks."""
    return key[:-1]


def key_flags(key: bytes) -> tuple[bool, bool]:
    """(DO, CD) of a cache key."""
    return bool(key[-1] & KEY_DO), bool(key[-1] & KEY_CD)


def raw_key(key: bytes) -> bytes:
    """The key of the upstream's own answer for the question of `key` (autopath keeps both apart)."""
    return key[:-1] + bytes((key[-1] | KEY_RAW,))


def plain_key(key: bytes) -> bytes:
    """The key without the raw mark: what a client's question makes."""
    return key[:-1] + bytes((key[-1] & ~KEY_RAW,))


def name_to_wire(name: str) -> bytes:
    """The lower-cased wire form of a dotted name ("" and "." are the root); ValueError for a bad name.

    RFC 1035 §2.3.4: labels of 1 to 63 octets, 255 octets in all; ASCII only (IDNs in punycode).
    """
    text = name.strip()
    labels = [label for label in text.rstrip(".").lower().split(".") if label] if text.strip(".") else []
    out = bytearray()
    for label in labels:
        try:
            raw = label.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"not an ASCII name: {name!r}") from None
        if len(raw) > 63:
            raise ValueError(f"label too long in {name!r}")
        out += bytes((len(raw),)) + raw
    if len(out) + 1 > 255:
        raise ValueError(f"name too long: {name!r}")
    return bytes(out) + b"\x00"


# The question of the proxy's own liveness checks (/health, the watchdog): under invalid., which
# RFC 6761 §6.4 lets a resolver answer with NXDOMAIN itself, so the check never needs kube-dns.
SELF_CHECK_QNAME = "health.kube-dns-proxy.invalid."


def self_query(qid: int, qname: str = SELF_CHECK_QNAME) -> bytes:
    """A plain stub query (RD=1, no EDNS) for an A record of qname, as the liveness checks send it."""
    return _HEADER.pack(qid, FLAG_RD, 1, 0, 0, 0) + name_to_wire(qname) + _U16X2.pack(1, 1)


def is_reply_to(reply: bytes, qid: int) -> bool:
    """Whether a datagram is a reply (QR=1) with our ID: enough for a liveness check, any rcode."""
    return len(reply) >= 12 and _U16.unpack_from(reply, 0)[0] == qid and bool(reply[2] & 0x80)


def build_upstream_query(qid: int, question: bytes, do: bool, cd: bool) -> bytes:
    """A query to send upstream: our random ID, RD=1, the client's CD, EDNS0 payload 1232 (RFC 6891)."""
    flags = FLAG_RD | (FLAG_CD if cd else 0)
    return _HEADER.pack(qid, flags, 1, 0, 0, 1) + question + opt_record(do)


def question_end(wire: bytes) -> int:
    """Offset just past the first question of a message (uncompressed name expected); WireError if none."""
    n = len(wire)
    pos = 12
    while True:
        if pos >= n:
            raise WireError("question runs past the end")
        length = wire[pos]
        if length == 0:
            break
        if length > 63:
            raise WireError("compressed or bad label in question")
        pos += length + 1
    if pos + 5 > n:
        raise WireError("question runs past the end")
    return pos + 5


# Cheap rdata checks for the common types, so a malformed record is never cached and served:
# fixed sizes (A, AAAA) and where a name starts (CNAME, NS, PTR, MX, SRV, SOA).
_FIXED_RDLENGTH = {1: 4, 28: 16}
_RDATA_NAME_AT = {2: 0, 5: 0, 12: 0, 15: 2, 33: 6, 6: 0}


class ReplyScan:
    """The layout of an upstream reply: where each record's TTL sits and what the cache policy needs."""

    __slots__ = (
        "rcode",
        "flags",
        "question_end",
        "ancount",
        "nscount",
        "arcount",
        "ttls",
        "ttl_offsets",
        "soa_ttl",
        "soa_minimum",
        "opt_start",
        "opt_index",
        "opt_is_last",
        "ext_rcode",
    )

    # Set by scan_reply, which fills every slot.
    rcode: int
    flags: int
    question_end: int
    ancount: int
    nscount: int
    arcount: int

    def __init__(self) -> None:
        self.ttls: list[int] = []
        self.ttl_offsets: list[int] = []
        self.soa_ttl: int | None = None
        self.soa_minimum: int | None = None
        self.opt_start: int | None = None
        self.opt_index = 0  # position of the OPT among the additional records
        self.opt_is_last = False
        self.ext_rcode = 0


def scan_reply(wire: bytes) -> ReplyScan:
    """Walk every record of a reply (bounds-checked) and note TTL offsets, SOA values and the OPT position."""
    n = len(wire)
    if n < 12:
        raise WireError("shorter than a header")
    _, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire, 0)
    if qdcount != 1:
        raise WireError("QDCOUNT is not 1")
    scan = ReplyScan()
    scan.flags = flags
    scan.rcode = flags & 0xF
    scan.ancount, scan.nscount, scan.arcount = ancount, nscount, arcount
    pos = scan.question_end = question_end(wire)
    total = ancount + nscount + arcount
    for index in range(total):
        start = pos
        name_end = skip_name(wire, pos)
        if name_end + 10 > n:
            raise WireError("record runs past the end")
        rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, name_end)
        rdata = name_end + 10
        pos = rdata + rdlength
        if pos > n:
            raise WireError("rdata runs past the end")
        if rtype == QTYPE_OPT:
            if scan.opt_start is not None or index < ancount + nscount:
                raise WireError("misplaced or repeated OPT")
            scan.opt_start = start
            scan.opt_index = index - ancount - nscount
            scan.opt_is_last = index == total - 1
            scan.ext_rcode = ttl >> 24
            continue
        fixed = _FIXED_RDLENGTH.get(rtype)
        if fixed is not None and rdlength != fixed:
            raise WireError("rdata length does not fit the type")
        name_at = _RDATA_NAME_AT.get(rtype)
        if name_at is not None and skip_name(wire, rdata + name_at) > pos:
            raise WireError("name in rdata runs past the rdata")
        if ttl & 0x80000000:
            ttl = 0  # RFC 2181 §8: a TTL with the top bit set is treated as zero
        scan.ttls.append(ttl)
        scan.ttl_offsets.append(name_end + 4)
        if ancount <= index < ancount + nscount and rtype == QTYPE_SOA and scan.soa_ttl is None:
            if rdlength < 22:
                raise WireError("SOA rdata too short")
            scan.soa_ttl = ttl
            scan.soa_minimum = _U32.unpack_from(wire, pos - 4)[0]
    if pos != n:
        raise WireError("trailing bytes after the last record")
    return scan


# What an autopath answer copies from the reply of the candidate it found (cname_answer): records
# whose rdata holds no name or one never compressed (DNAME: RFC 6672 §2.5; RRSIG, NSEC: RFC 4034
# §3.1.7, §4.1.1; NSEC3 holds hashes), and those with a name, expanded, after N fixed octets.
_COPIED_AS_IS = frozenset({1, 28, 39, 46, 47, 50})
_NAME_AFTER = {QTYPE_CNAME: 0, QTYPE_NS: 0, 12: 0, 15: 2}


def expand_name(message: bytes, pos: int) -> tuple[bytes, int]:
    """The name at pos in uncompressed wire form (case kept) and the offset just past it where it is written."""
    out = bytearray()
    end: int | None = None
    jumps = 0
    n = len(message)
    while True:
        if pos >= n:
            raise WireError("name runs past the end")
        length = message[pos]
        if length == 0:
            out.append(0)
            return bytes(out), pos + 1 if end is None else end
        if length & 0xC0 == 0xC0:
            if pos + 2 > n or jumps >= 64:
                raise WireError("bad compression pointer")
            if end is None:
                end = pos + 2
            pos = ((length & 0x3F) << 8) | message[pos + 1]
            jumps += 1
            continue
        if length & 0xC0:
            raise WireError("unknown label type")
        if pos + 1 + length > n:
            raise WireError("name runs past the end")
        out += message[pos : pos + 1 + length]
        if len(out) > 254:
            raise WireError("name longer than 255 octets")
        pos += length + 1


def _expanded_rdata(message: bytes, rtype: int, start: int, end: int) -> bytes:
    """The rdata of one record with its names uncompressed; WireError for a type whose layout we do not know."""
    if rtype in _COPIED_AS_IS:
        return message[start:end]
    if rtype == QTYPE_SOA:
        mname, pos = expand_name(message, start)
        rname, pos = expand_name(message, pos)
        if end - pos != 20:
            raise WireError("SOA rdata has the wrong length")
        return mname + rname + message[pos:end]
    fixed = _NAME_AFTER.get(rtype)
    if fixed is None:
        raise WireError(f"type {rtype} is not copied into an autopath answer")
    name, pos = expand_name(message, start + fixed)
    if pos != end:
        raise WireError("name in rdata does not end the rdata")
    return message[start : start + fixed] + name


def cname_answer(question: bytes, target: bytes, reply: bytes) -> bytes:
    """An answer to `question` (an uncompressed question): a CNAME to `target`, then the reply to `target`.

    The reply's answer and authority records follow the CNAME as they are (a CNAME chain at the
    target is kept; a NODATA reply gives the CNAME alone and the reply's SOA in authority, RFC 2308
    §2.2); its additional records are left out. Every name is written uncompressed, so no pointer
    of the reply can land on the wrong bytes; the CNAME's owner points at the question (offset 12).
    TTLs are the reply's: the cache entry made of this answer sets them all. No OPT: it is added
    per client. WireError if the reply holds a record whose names we cannot place.
    """
    n = len(reply)
    _, _, _, ancount, nscount, _ = _HEADER.unpack_from(reply, 0)
    pos = question_end(reply)
    records = []
    for _ in range(ancount + nscount):
        owner, pos = expand_name(reply, pos)
        if pos + 10 > n:
            raise WireError("record runs past the end")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(reply, pos)
        start, pos = pos + 10, pos + 10 + rdlength
        if pos > n:
            raise WireError("rdata runs past the end")
        rdata = _expanded_rdata(reply, rtype, start, pos)
        records.append(owner + _RR_FIXED.pack(rtype, rclass, ttl, len(rdata)) + rdata)
    qclass = _U16.unpack_from(question, len(question) - 2)[0]
    cname = b"\xc0\x0c" + _RR_FIXED.pack(QTYPE_CNAME, qclass, 0, len(target)) + target
    header = _HEADER.pack(0, FLAG_QR | FLAG_RD | FLAG_RA, 1, 1 + ancount, nscount, 0)
    message = header + question + cname + b"".join(records)
    if len(message) > 65535:
        raise WireError("answer longer than a DNS message")
    return message
