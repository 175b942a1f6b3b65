"""Coverage-guided fuzz target (atheris) for the query path and the upstream-reply path, without sockets.

Run by hand from anywhere: `python fuzz/fuzz_query.py -max_total_time=600` (libFuzzer flags pass
through), or `python fuzz/fuzz_query.py --no-atheris -max_total_time=600` for a plain random
mutation loop when atheris is not installed. See fuzz/README.md.

Every input is used twice: as a client query (QueryHandler.parse, then a cached entry for its
question rendered fresh and stale) and as an upstream reply (cache.entry_from_reply, then rendered
for a query asking its question). A broken invariant raises AssertionError; any exception other
than the documented ones escapes too; both are crashes for libFuzzer.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rrset

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

try:
    import atheris
except ImportError:  # the plain loop (--no-atheris) works without it
    atheris = None

_HEADER = struct.Struct("!HHHHHH")
FLAG_QR = 0x8000
FRESH_TTL = 300
MAX_SIZES = (512, 1232, 4096, 65535)


def _import_targets():
    """Import the proxy modules, instrumented for coverage when atheris is present."""
    if atheris is not None and "--no-atheris" not in sys.argv:
        with atheris.instrument_imports(include=["wire", "cache", "proxy", "config", "resolver", "server"]):
            import cache
            import config
            import logs
            import proxy
            import wire
    else:
        import cache
        import config
        import logs
        import proxy
        import wire
    return cache, config, logs, proxy, wire


cache, config, logs, proxy, wire = _import_targets()

# One proxy for the whole run, wired as main() wires it but never started: no socket is opened.
# Debug level with --log-queries runs the logging calls of the query path; the lines are discarded.
_CONFIG = config.build_config(
    ["--listen", "127.0.0.1:5300", "--upstream", "127.0.0.1:5301", "--log-queries", "--log-level", "debug"],
    environ={},
)
_LOG = logs.configure_logging("debug", stream=open(os.devnull, "w"))  # noqa: SIM115
_PROXY = proxy.Proxy(_CONFIG, _LOG)
_CACHE = _PROXY.cache
_RESOLVER = _PROXY.resolver
_HANDLER = _PROXY.handler
_POLICY = cache.TtlPolicy()


def _parse(answer: bytes) -> dns.message.Message:
    """Parse an answer as a client would; a failure is a broken invariant."""
    try:
        return dns.message.from_wire(answer)
    except dns.exception.DNSException as exc:
        raise AssertionError(f"answer does not parse: {exc!r}: {answer.hex()}") from None


def _dnspython_accepts(message: bytes) -> bool:
    try:
        dns.message.from_wire(message)
    except Exception:  # any failure (dnspython may fail oddly on hostile input) makes it no reference
        return False
    return True


def points_into_header(message: bytes) -> bool:
    """True if any two bytes after the header could be a compression pointer into the header."""
    return any(
        message[i] >= 0xC0 and ((message[i] & 0x3F) << 8 | message[i + 1]) < 12 for i in range(12, len(message) - 1)
    )


def reply_for(question: bytes, qid: int = 0x1234, answers: int = 2, edns: bool = False) -> bytes:
    """A well-formed upstream reply to `question`: A records (c00c), optionally with an OPT at the end."""
    header = _HEADER.pack(qid, 0x8180, 1, answers, 0, 1 if edns else 0)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, FRESH_TTL, 4) + bytes((192, 0, 2, 1))
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0) if edns else b""
    return header + question + record * answers + opt


def check_query_side(data: bytes) -> None:
    """QueryHandler.parse on client bytes, then a cached answer for its question rendered fresh and stale."""
    query, answer = _HANDLER.parse(data)
    if query is None and answer is None:
        assert len(data) < 12 or data[2] & 0x80, "dropped a packet that has a header and QR=0"
        return
    assert len(data) >= 12 and not data[2] & 0x80, "answered a packet that must be dropped"
    if answer is not None:
        message = _parse(answer)
        assert answer[:2] == data[:2], "error answer does not echo the ID"
        assert message.flags & dns.flags.QR
        assert message.rcode() in (wire.FORMERR, wire.NOTIMP, wire.BADVERS)
        return
    check_query_fields(query, data)
    if hasattr(_HANDLER, "refuse"):
        # A client outside --allow: REFUSED with the ID and question, and the same drops as above.
        refused = _parse(_HANDLER.refuse(data))
        assert refused.rcode() == wire.REFUSED and refused.id == query.wire[0] << 8 | query.wire[1]
    # A cached entry for this question, as the resolver stores it, answered fresh from the cache.
    entry, cacheable = cache.entry_from_reply(reply_for(query.question, edns=True), _POLICY, _RESOLVER.timer())
    assert cacheable, "a plain NOERROR answer with two A records was not cacheable"
    _CACHE.store(query.key, entry)
    max_size = MAX_SIZES[data[-1] % len(MAX_SIZES)]
    fresh = _RESOLVER.answer_fresh(query, max_size, "udp")
    assert fresh is not None, "a fresh entry just stored was not answered"
    check_rendered(fresh, query, max_size, ttl=FRESH_TTL)
    stale = entry.render(query, _CONFIG.stale_ttl, max_size, stale=True)
    check_rendered(stale, query, max_size, ttl=_CONFIG.stale_ttl)
    if query.edns and not stale[2] & 0x02:
        ede = [o for o in _parse(stale).options if o.otype == 15]
        assert ede and ede[0].code == wire.EDE_STALE_ANSWER, "stale answer to an EDNS query without EDE 3"


def check_query_fields(query, data: bytes) -> None:
    """The fields of a parsed Query agree with the bytes they came from."""
    assert query.wire is data
    assert query.flags == struct.unpack_from("!H", data, 2)[0]
    assert not query.flags & FLAG_QR and (query.flags >> 11) & 0xF == 0
    question = query.question
    assert data[12 : 12 + len(question)] == question
    assert question[-5] == 0, "question name does not end with the root label"
    assert len(question) - 4 <= 255, "question name longer than 255 octets"
    assert struct.unpack("!HH", question[-4:]) == (query.qtype, query.qclass)
    flag_byte = (wire.KEY_DO if query.do else 0) | (wire.KEY_CD if query.cd else 0)
    assert query.key == question[:-4].lower() + question[-4:] + bytes((flag_byte,))
    assert query.cd == bool(query.flags & wire.FLAG_CD)
    assert query.edns or (not query.do and query.max_udp == wire.MAX_UDP_NO_EDNS)
    assert 512 <= query.max_udp <= 65535
    assert query.qname.endswith(".")


def check_rendered(answer: bytes, query, max_size: int, ttl: int | None) -> None:
    """A rendered answer parses, echoes ID and question, fits max_size, and carries OPT only for EDNS queries."""
    assert len(answer) <= max_size, "answer larger than the client takes"
    message = _parse(answer)
    assert answer[:2] == query.wire[:2], "answer does not echo the ID"
    assert answer[12 : 12 + len(query.question)] == query.question, "answer does not echo the question"
    assert message.flags & dns.flags.QR and message.flags & dns.flags.RA
    assert not message.flags & dns.flags.AA, "AA set by a cache"
    assert (message.edns >= 0) == query.edns, "OPT presence differs from the query's"
    if ttl is not None:
        for rrset in message.answer:
            assert rrset.ttl == ttl, f"answer TTL {rrset.ttl}, expected {ttl}"


def check_reply_side(data: bytes) -> None:
    """entry_from_reply on upstream bytes raises only WireError; a returned entry renders to a sane answer."""
    try:
        entry, cacheable = cache.entry_from_reply(data, _POLICY, 1000.0)
    except wire.WireError:
        return
    assert entry.wire[:2] == data[:2]
    assert entry.ttl >= 0
    if cacheable:
        assert not data[2] & 0x02, "a TC=1 reply was cacheable"
        assert entry.rcode in (wire.NOERROR, wire.NXDOMAIN), f"rcode {entry.rcode} cacheable"
        assert entry.ttl <= _POLICY.max_ttl
    # A client query asking exactly the reply's question, with and without EDNS.
    question = data[12 : wire.question_end(data)]
    for edns in (False, True):
        opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0) if edns else b""
        client = _HEADER.pack(0xBEEF, 0x0100, 1, 0, 0, 1 if edns else 0) + question + opt
        try:
            query = wire.parse_query(client)
        except wire.BadQuery:
            continue  # e.g. a name over 255 octets, which a client cannot ask
        rendered = entry.render(query, 5, 65535)
        assert rendered[:2] == b"\xbe\xef" and rendered[2] & 0x80, "answer lost the ID or QR"
        wire.scan_reply(rendered)  # the proxy's own structure check holds for what it sends
        # The proxy must not break a reply a client could parse (a bogus compression pointer
        # into the header, which the proxy rewrites, is no such reply: RFC 1035 §4.1.4).
        if not points_into_header(data) and _dnspython_accepts(data):
            check_rendered(rendered, query, 65535, ttl=5 if cacheable and entry.ttl_offsets else None)


def test_one_input(data: bytes) -> None:
    check_query_side(data)
    check_reply_side(data)


def seed_inputs() -> list[bytes]:
    """Valid queries and replies that give the fuzzer a start: plain, EDNS, DO/CD, NXDOMAIN with SOA."""
    seeds = []
    for qname, qtype in (("kubernetes.default.svc.cluster.local", "A"), ("a.b", "AAAA"), (".", "NS")):
        for use_edns, want_dnssec in ((False, False), (0, False), (0, True)):
            message = dns.message.make_query(qname, qtype, use_edns=use_edns, want_dnssec=want_dnssec)
            message.flags |= dns.flags.CD if want_dnssec else 0
            wire_query = message.to_wire()
            seeds.append(wire_query)
            question = wire_query[12 : wire.question_end(wire_query)]
            seeds.append(reply_for(question, answers=1))
            seeds.append(reply_for(question, answers=3, edns=True))
            nx = dns.message.make_response(message)
            nx.set_rcode(dns.rcode.NXDOMAIN)
            soa = dns.rrset.from_text("cluster.local.", 5, "IN", "SOA", "ns. host. 1 7200 1800 86400 5")
            nx.authority.append(soa)
            seeds.append(nx.to_wire())
    return seeds


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four byte-level mutations: flips, overwrites with DNS-significant bytes, cuts, copies."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        if not buf or choice == 0:
            buf += rng.randbytes(rng.randint(1, 16))
        elif choice == 1:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif choice == 2:
            buf[rng.randrange(len(buf))] = rng.choice((0x00, 0x3F, 0x40, 0x80, 0xC0, 0xC0 | 12 >> 8, 0x0C, 0xFF))
        elif choice == 3:
            del buf[rng.randrange(len(buf)) :]
        elif choice == 4:
            start = rng.randrange(len(buf))
            chunk = buf[start : start + rng.randint(1, 32)]
            where = rng.randrange(len(buf) + 1)
            buf[where:where] = chunk
        else:
            where = rng.randrange(max(1, len(buf) - 1))
            buf[where : where + 2] = struct.pack("!H", rng.choice((0, 1, 2, 41, 0xC00C, 0xFFFF, rng.randrange(65536))))
    return bytes(buf)


def run_plain(max_total_time: float, runs: int, seed: int) -> int:
    """The fallback loop without atheris: random mutations of the seeds and of earlier inputs."""
    rng = random.Random(seed)
    pool = seed_inputs()
    end = time.monotonic() + max_total_time
    done = 0
    while time.monotonic() < end and (runs <= 0 or done < runs):
        data = mutate(rng.choice(pool), rng) if rng.random() < 0.9 else rng.randbytes(rng.randint(0, 600))
        try:
            test_one_input(data)
        except BaseException:
            print(f"crash after {done} inputs; input hex: {data.hex()}", file=sys.stderr)
            raise
        done += 1
        if len(pool) < 5000 and rng.random() < 0.05:
            pool.append(data)
    print(f"done: {done} inputs in {max_total_time if runs <= 0 else 'a bounded run'} s, no crash (seed {seed})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--no-atheris", action="store_true", help="plain random mutation loop, no coverage")
    parser.add_argument("--seed", type=int, default=None, help="seed of the plain loop")
    ours, rest = parser.parse_known_args()
    if ours.no_atheris or atheris is None:
        if atheris is None and not ours.no_atheris:
            print("atheris is not installed: running the plain loop (--no-atheris)", file=sys.stderr)
        flags = dict(arg[1:].split("=", 1) for arg in rest if arg.startswith("-") and "=" in arg)
        seed = ours.seed if ours.seed is not None else int.from_bytes(os.urandom(4), "big")
        return run_plain(float(flags.get("max_total_time", 60)), int(flags.get("runs", 0)), seed)
    # Seeds go to a fresh corpus directory unless the caller names corpus directories itself.
    if not any(not arg.startswith("-") for arg in rest):
        corpus = Path(tempfile.mkdtemp(prefix="fuzz-query-corpus-"))
        for index, data in enumerate(seed_inputs()):
            (corpus / f"seed-{index:03d}").write_bytes(data)
        rest.append(str(corpus))
        print(f"corpus: {corpus}", file=sys.stderr)
    atheris.Setup([sys.argv[0], *rest], test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
