"""The cache policy and store, with a fake clock: what is cached, for how long, stale, LRU capacity."""

from __future__ import annotations

import dnslib
import pytest

import wire
from cache import AnswerCache, TtlPolicy, answer_ttl, entry_from_reply
from conftest import Clock

SOA = dnslib.SOA("ns.dns.cluster.local", "hostmaster.cluster.local", (1, 7200, 1800, 86400, 5))


def make_reply(
    qname: str = "web.default.svc.cluster.local",
    qtype: str = "A",
    rcode: int = 0,
    answers: list[tuple[str, str, int]] | None = None,
    soa_ttl: int | None = None,
    edns: bool = True,
    tc: bool = False,
) -> bytes:
    """An upstream-style reply built with dnslib."""
    query = dnslib.DNSRecord.question(qname, qtype)
    reply = query.reply()
    reply.header.aa = 0
    reply.header.rcode = rcode
    reply.header.tc = int(tc)
    for rtype, rdata, ttl in answers or []:
        rdata_obj = {"A": dnslib.A, "AAAA": dnslib.AAAA, "CNAME": dnslib.CNAME}[rtype](rdata)
        reply.add_answer(dnslib.RR(qname, getattr(dnslib.QTYPE, rtype), rdata=rdata_obj, ttl=ttl))
    if soa_ttl is not None:
        reply.add_auth(dnslib.RR("cluster.local", dnslib.QTYPE.SOA, rdata=SOA, ttl=soa_ttl))
    if edns:
        reply.add_ar(dnslib.EDNS0(udp_len=1232))
    return reply.pack()


def make_query(qname: str = "web.default.svc.cluster.local", qtype: str = "A", edns: bool = False, **kw) -> wire.Query:
    record = dnslib.DNSRecord.question(qname, qtype)
    if edns:
        record.add_ar(dnslib.EDNS0(udp_len=kw.get("payload", 1232), flags="do" if kw.get("do") else ""))
    record.header.id = kw.get("qid", 4242)
    return wire.parse_query(record.pack())


class TestPolicy:
    """What entry_from_reply caches and for how long (RFC 2308, RFC 8767)."""

    @pytest.mark.parametrize(
        ("reply_kwargs", "cacheable", "ttl"),
        [
            ({"answers": [("A", "10.0.0.1", 30)]}, True, 30),
            ({"answers": [("A", "10.0.0.1", 30), ("A", "10.0.0.2", 12)]}, True, 12),
            ({"answers": [("A", "10.0.0.1", 7200)]}, True, 3600),
            ({"answers": [("A", "10.0.0.1", 0)]}, True, 0),
            ({"rcode": 3, "soa_ttl": 30}, True, 5),  # min(SOA TTL 30, MINIMUM 5)
            ({"rcode": 3, "soa_ttl": 2}, True, 2),
            ({"rcode": 0, "soa_ttl": 30}, True, 5),  # NODATA
            ({"rcode": 3}, False, 0),  # NXDOMAIN without SOA
            ({"rcode": 0}, False, 0),  # NODATA without SOA
            ({"rcode": 2}, False, 0),
            ({"rcode": 5}, False, 0),
            ({"answers": [("A", "10.0.0.1", 30)], "tc": True}, False, 0),
        ],
    )
    def test_cacheability_and_lifetime(self, reply_kwargs, cacheable, ttl):
        """Each kind of reply is cached or not, for the lifetime the RFCs give, clamped by the policy."""
        entry, ok = entry_from_reply(make_reply(**reply_kwargs), TtlPolicy(), 100.0)
        assert ok is cacheable
        if cacheable:
            assert entry.ttl == ttl

    def test_min_ttl_raises_short_ttls(self):
        """--min-ttl lifts a short positive TTL."""
        entry, _ = entry_from_reply(make_reply(answers=[("A", "10.0.0.1", 3)]), TtlPolicy(min_ttl=10), 0.0)
        assert entry.ttl == 10

    def test_max_negative_ttl_caps_denial(self):
        """--max-negative-ttl caps an NXDOMAIN lifetime."""
        soa = dnslib.SOA("ns", "h", (1, 2, 3, 4, 900))
        query = dnslib.DNSRecord.question("nx.cluster.local")
        reply = query.reply()
        reply.header.rcode = 3
        reply.add_auth(dnslib.RR("cluster.local", dnslib.QTYPE.SOA, rdata=soa, ttl=900))
        entry, ok = entry_from_reply(reply.pack(), TtlPolicy(max_negative_ttl=60), 0.0)
        assert ok and entry.ttl == 60

    def test_opt_is_not_stored(self):
        """The upstream's OPT record is cut off: OPT is hop-by-hop (RFC 6891 §6.1.1)."""
        entry, _ = entry_from_reply(make_reply(answers=[("A", "10.0.0.1", 30)]), TtlPolicy(), 0.0)
        parsed = dnslib.DNSRecord.parse(entry.wire)
        assert parsed.ar == [] and parsed.header.ar == 0
        assert len(parsed.rr) == 1

    def test_malformed_reply_raises_wire_error(self):
        """A reply whose record runs past the end is rejected, not cached."""
        reply = make_reply(answers=[("A", "10.0.0.1", 30)], edns=False)
        with pytest.raises(wire.WireError):
            entry_from_reply(reply[:-2], TtlPolicy(), 0.0)


class TestRender:
    """How a cached entry becomes the answer to a particular client query."""

    def test_id_question_case_and_ttl_rewritten(self):
        """The answer carries the client's ID, its question case, and the TTL given."""
        entry, _ = entry_from_reply(make_reply(answers=[("A", "10.0.0.1", 30)]), TtlPolicy(), 0.0)
        query = make_query("WeB.Default.svc.cluster.LOCAL", qid=777)
        answer = dnslib.DNSRecord.parse(entry.render(query, 17, 512))
        assert answer.header.id == 777
        assert str(answer.q.qname) == "WeB.Default.svc.cluster.LOCAL."
        assert answer.rr[0].ttl == 17
        assert answer.header.ra == 1 and answer.header.aa == 0 and answer.header.qr == 1

    def test_opt_only_when_query_had_one(self):
        """An answer carries an OPT record only if the query did (RFC 6891 §7)."""
        entry, _ = entry_from_reply(make_reply(answers=[("A", "10.0.0.1", 30)]), TtlPolicy(), 0.0)
        without = dnslib.DNSRecord.parse(entry.render(make_query(), 30, 512))
        with_edns = dnslib.DNSRecord.parse(entry.render(make_query(edns=True, do=True), 30, 1232))
        assert without.ar == []
        assert len(with_edns.ar) == 1 and with_edns.ar[0].rtype == dnslib.QTYPE.OPT
        assert with_edns.ar[0].edns_do == 1

    def test_stale_answer_carries_ede_3(self):
        """A stale answer to an EDNS client carries Extended DNS Error 3, Stale Answer (RFC 8914)."""
        entry, _ = entry_from_reply(make_reply(answers=[("A", "10.0.0.1", 30)]), TtlPolicy(), 0.0)
        answer = dnslib.DNSRecord.parse(entry.render(make_query(edns=True), 30, 1232, stale=True))
        option = answer.ar[0].rdata[0]
        assert option.code == 15 and option.data == b"\x00\x03"

    def test_too_large_for_client_is_truncated(self):
        """An answer larger than the client's limit becomes TC=1 with no records."""
        answers = [("A", f"10.0.{i // 250}.{i % 250}", 30) for i in range(60)]
        entry, _ = entry_from_reply(make_reply(answers=answers), TtlPolicy(), 0.0)
        truncated = dnslib.DNSRecord.parse(entry.render(make_query(qid=9), 30, 512))
        assert truncated.header.tc == 1 and truncated.rr == [] and truncated.header.id == 9
        whole = dnslib.DNSRecord.parse(entry.render(make_query(qid=9), 30, 65535))
        assert whole.header.tc == 0 and len(whole.rr) == 60


class TestStore:
    """The LRU store: stale computed from the clock, only capacity evicts."""

    def test_stale_is_computed_not_evicted(self):
        """Past its TTL an entry is still there, flagged stale by its negative remaining TTL."""
        clock = Clock()
        cache = AnswerCache(10, timer=clock)
        entry, _ = entry_from_reply(make_reply(answers=[("A", "10.0.0.1", 30)]), TtlPolicy(), clock())
        cache.store(b"k", entry)
        clock.now += 29.5
        assert not cache.lookup(b"k").is_stale(clock())
        assert answer_ttl(entry, clock()) == 1
        clock.now += 10**6
        found = cache.lookup(b"k")
        assert found is entry and found.is_stale(clock()) and found.remaining_ttl(clock()) < 0

    def test_ttl_counts_down_by_whole_seconds(self):
        """The TTL served is the stored TTL less the whole seconds elapsed."""
        clock = Clock()
        entry, _ = entry_from_reply(make_reply(answers=[("A", "10.0.0.1", 30)]), TtlPolicy(), clock())
        assert answer_ttl(entry, clock.now) == 30
        assert answer_ttl(entry, clock.now + 0.4) == 30
        assert answer_ttl(entry, clock.now + 1.2) == 29
        assert answer_ttl(entry, clock.now + 29.9) == 1

    def test_capacity_evicts_least_recently_used(self):
        """A full cache drops the entry used least recently; lookup counts as use."""
        cache = AnswerCache(3)
        entry, _ = entry_from_reply(make_reply(answers=[("A", "10.0.0.1", 30)]), TtlPolicy(), 0.0)
        for key in (b"a", b"b", b"c"):
            cache.store(key, entry)
        assert cache.lookup(b"a") is entry  # a is now the most recent
        cache.store(b"d", entry)
        assert cache.lookup(b"b") is None
        assert {k for k, _ in cache.entries()} == {b"a", b"c", b"d"}
        assert cache.evictions == 1

    def test_counts_fresh_and_stale(self):
        """counts() splits entries into fresh and stale by the clock."""
        clock = Clock()
        cache = AnswerCache(10, timer=clock)
        short, _ = entry_from_reply(make_reply(answers=[("A", "10.0.0.1", 5)]), TtlPolicy(), clock())
        long, _ = entry_from_reply(make_reply(answers=[("A", "10.0.0.1", 50)]), TtlPolicy(), clock())
        cache.store(b"s", short)
        cache.store(b"l", long)
        assert cache.counts(clock.now + 10) == (1, 1)
