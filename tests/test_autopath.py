"""--autopath specified case by case: resolver.Resolver in-process, a fake clock, an upstream answering from a table.

No sockets and no sleeps: the upstream is upstream.Upstreams with its exchange replaced by a lookup
in ZONES (names that exist, a CNAME chain, NODATA, SERVFAIL, a name that never answers); every
other name is NXDOMAIN with the SOA of its zone. The only real time spent is the walk's budget in
the one test that lets it run out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dnslib
import gevent.event
import pytest
import structlog

import config
import persist
import routing
import wire
from autopath import SearchPath
from cache import AnswerCache
from configfile import LIVE_FIELDS
from conftest import Clock
from metrics import ProxyCollector, Stats
from resolver import Resolver
from upstream import UpstreamError, Upstreams

pytestmark = pytest.mark.unit

NODE_SEARCH = "corp.example.net"
CLUSTER_NEGATIVE_TTL = 5  # CoreDNS's kubernetes plugin: SOA TTL and MINIMUM 5
EXTERNAL_NEGATIVE_TTL = 30
WALK_BUDGET = 0.05  # real seconds: spent only by the test whose candidate never answers

# name -> {qtype: [(type, ttl, rdata text)]} or a mode: "servfail", "hang". Other names: NXDOMAIN.
ZONES: dict[str, dict[str, list[tuple[str, int, str]]] | str] = {
    "web.default.svc.cluster.local.": {"A": [("A", 30, "192.0.2.20")], "AAAA": [("AAAA", 30, "2001:db8::20")]},
    "db.staging.svc.cluster.local.": {"A": [("A", 30, "192.0.2.21")]},
    "www.example.com.": {"A": [("A", 60, "192.0.2.10")], "AAAA": [("AAAA", 60, "2001:db8::10")]},
    "short.example.com.": {"A": [("A", 3, "192.0.2.11")]},
    "alias.example.com.": {"A": [("CNAME", 60, "www.example.com."), ("A", 60, "192.0.2.10")]},
    "txt-only.example.com.": {"TXT": [("TXT", 60, "only text")]},
    "api.corp.example.net.": {"A": [("A", 60, "192.0.2.30")]},
    "broken.corp.example.net.": "servfail",
    "slow.corp.example.net.": "hang",
    "big.example.com.": {"A": [("A", 60, f"192.0.2.{i}") for i in range(1, 61)]},
    "a.b.c.d.e.f.": {"A": [("A", 60, "192.0.2.40")]},
}


def zone_of(qname: str) -> tuple[str, int]:
    """The zone apex of a name and the TTL of its negative answers."""
    for apex, ttl in (("cluster.local.", CLUSTER_NEGATIVE_TTL), ("example.com.", EXTERNAL_NEGATIVE_TTL)):
        if qname.endswith("." + apex) or qname == apex:
            return apex, ttl
    if qname.endswith(".example.net."):
        return "example.net.", EXTERNAL_NEGATIVE_TTL
    return ".", EXTERNAL_NEGATIVE_TTL


class TableUpstreams(Upstreams):
    """Upstreams whose exchange answers from ZONES instead of a socket."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(
            (config.parse_endpoint("127.0.0.1:5301"),),
            1.0,
            4.0,
            False,
            structlog.get_logger(),
            timer=clock,
        )
        self.asked: list[tuple[str, str]] = []
        self.release = gevent.event.Event()  # never set: a "hang" lasts until the try times out

    def _exchange_udp(self, server, question: bytes, do: bool, cd: bool, timeout: float) -> bytes:
        request = dnslib.DNSRecord.parse(wire.build_upstream_query(0x4242, question, do, cd))
        qname = str(request.q.qname).lower()
        qtype = dnslib.QTYPE[request.q.qtype]
        self.asked.append((qname, qtype))
        node = ZONES.get(qname)
        reply = request.reply()
        if node == "hang":
            self.release.wait(timeout)
            raise UpstreamError("timeout")
        if node == "servfail":
            reply.header.rcode = dnslib.RCODE.SERVFAIL
            return reply.pack()
        records = node.get(qtype) if isinstance(node, dict) else None
        if records:
            owner = qname
            for rtype, ttl, text in records:
                rdata = {"A": dnslib.A, "AAAA": dnslib.AAAA, "CNAME": dnslib.CNAME, "TXT": dnslib.TXT}[rtype](text)
                reply.add_answer(dnslib.RR(owner, getattr(dnslib.QTYPE, rtype), rdata=rdata, ttl=ttl))
                if rtype == "CNAME":
                    owner = text
            return reply.pack()
        apex, negative_ttl = zone_of(qname)
        if node is None:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
        soa = dnslib.SOA(f"ns.{apex}".replace("..", "."), f"hostmaster.{apex}".replace("..", "."),
                         (1, 7200, 1800, 86400, negative_ttl))  # fmt: skip
        reply.add_auth(dnslib.RR(apex, dnslib.QTYPE.SOA, rdata=soa, ttl=negative_ttl))
        return reply.pack()

    _exchange_tcp = _exchange_udp


@dataclass
class Engine:
    """A Resolver with --autopath, its clock, cache, stats and table upstream."""

    clock: Clock
    upstreams: TableUpstreams
    resolver: Resolver
    cache: AnswerCache
    stats: Stats
    outcomes: list[str] = field(default_factory=list)

    def ask(
        self, qname: str, qtype: str = "A", *, edns: bool = True, max_size: int = 1232, qid: int | None = None
    ) -> dns.message.Message:
        """Resolve one query through the full path; the answer parsed by dnspython."""
        request = dns.message.make_query(qname, qtype, use_edns=0 if edns else False)
        if qid is not None:
            request.id = qid
        query = wire.parse_query(request.to_wire())
        answer, outcome = self.resolver.resolve(query, max_size)
        self.outcomes.append(outcome)
        return dns.message.from_wire(answer)

    def hot_path(self, qname: str, qtype: str = "A") -> dns.message.Message | None:
        """The answer of the UDP hot path (Resolver.answer_fresh_udp), None when it needs the full path."""
        data = dns.message.make_query(qname, qtype, use_edns=0).to_wire()
        self.resolver.remember(data, wire.parse_query(data))
        answer = self.resolver.answer_fresh_udp(data)
        return None if answer is None else dns.message.from_wire(answer)

    def asked_names(self) -> list[str]:
        return [name for name, _ in self.upstreams.asked]


def make_engine(*flags: str) -> Engine:
    clock = Clock()
    built = config.build_config(
        [
            "--upstream",
            "127.0.0.1:5301",  # never contacted: TableUpstreams answers
            "--autopath",
            "--search",
            NODE_SEARCH,
            "--autopath-timeout",
            str(WALK_BUDGET),
            *flags,
        ],
        environ={},
    )
    upstreams = TableUpstreams(clock)
    cache = AnswerCache(built.cache_size)
    stats = Stats()
    router = routing.build_router(built, structlog.get_logger(), default=upstreams)
    resolver = Resolver(built, cache, router, stats, structlog.get_logger(), timer=clock)
    return Engine(clock, upstreams, resolver, cache, stats)


@pytest.fixture
def e() -> Iterator[Engine]:
    built = make_engine()
    yield built
    built.resolver.fetch_pool.kill()


def first(base: str, namespace: str = "default") -> str:
    """A pod's first search candidate for base."""
    return f"{base}.{namespace}.svc.cluster.local."


def records(message: dns.message.Message, section: str = "answer") -> list[tuple[str, str, int, str]]:
    """(owner, type, ttl, rdata) of every record of a section, in order."""
    return [
        (rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), rrset.ttl, rdata.to_text())
        for rrset in getattr(message, section)
        for rdata in rrset
    ]


def addresses(message: dns.message.Message) -> list[str]:
    return sorted(r[3] for r in records(message) if r[1] in ("A", "AAAA"))


class TestWalk:
    """What a first candidate that is NXDOMAIN is answered, and what the walk asks upstream."""

    def test_external_name_walks_the_search_path_in_the_pods_order(self, e: Engine) -> None:
        """www.example.com: the candidates are asked as the pod would, the answer is a CNAME to the one that exists."""
        answer = e.ask(first("www.example.com"))
        assert e.asked_names() == [
            "www.example.com.default.svc.cluster.local.",
            "www.example.com.svc.cluster.local.",
            "www.example.com.cluster.local.",
            "www.example.com.corp.example.net.",
            "www.example.com.",
        ]
        assert answer.rcode() == dns.rcode.NOERROR
        assert [(r[0], r[1], r[3]) for r in records(answer)] == [
            (first("www.example.com"), "CNAME", "www.example.com."),
            ("www.example.com.", "A", "192.0.2.10"),
        ]
        assert e.outcomes == ["autopath"]
        assert (e.stats.autopath_answers, e.stats.autopath_skipped, e.stats.autopath_abandoned) == (1, 3, 0)

    def test_node_search_domain_candidate(self, e: Engine) -> None:
        """A short name that exists in a node search domain is found there, before the bare name."""
        answer = e.ask(first("api"))
        assert records(answer)[0][3] == "api.corp.example.net."
        assert addresses(answer) == ["192.0.2.30"]
        assert e.asked_names()[-1] == "api.corp.example.net."

    def test_other_namespace_service_found_under_svc(self, e: Engine) -> None:
        """`db.staging` from namespace default: found at db.staging.svc.cluster.local, the second candidate."""
        answer = e.ask(first("db.staging"))
        assert records(answer)[0][3] == "db.staging.svc.cluster.local."
        assert e.asked_names() == ["db.staging.default.svc.cluster.local.", "db.staging.svc.cluster.local."]

    def test_ttl_is_the_shortest_of_the_walk(self, e: Engine) -> None:
        """Every record carries the shortest TTL involved: here the cluster zone's negative TTL (5)."""
        answer = e.ask(first("www.example.com"))
        assert {r[2] for r in records(answer)} == {CLUSTER_NEGATIVE_TTL}

    def test_ttl_of_the_candidate_when_shorter(self, e: Engine) -> None:
        """A candidate whose own TTL is shorter than every negative TTL sets the answer's TTL."""
        answer = e.ask(first("short.example.com"))
        assert {r[2] for r in records(answer)} == {3}

    def test_cname_chain_at_the_candidate_kept(self, e: Engine) -> None:
        """The candidate's answer records follow the CNAME as they are: a chain stays a chain."""
        answer = e.ask(first("alias.example.com"))
        assert [(r[0], r[1], r[3]) for r in records(answer)] == [
            (first("alias.example.com"), "CNAME", "alias.example.com."),
            ("alias.example.com.", "CNAME", "www.example.com."),
            ("www.example.com.", "A", "192.0.2.10"),
        ]

    def test_nodata_at_the_candidate(self, e: Engine) -> None:
        """A candidate with no record of the type: NOERROR, the CNAME alone, the candidate's SOA in authority."""
        answer = e.ask(first("txt-only.example.com"))
        assert answer.rcode() == dns.rcode.NOERROR
        assert [(r[1], r[3]) for r in records(answer)] == [("CNAME", "txt-only.example.com.")]
        assert [(r[0], r[1]) for r in records(answer, "authority")] == [("example.com.", "SOA")]
        assert {r[2] for r in records(answer) + records(answer, "authority")} == {CLUSTER_NEGATIVE_TTL}

    def test_nothing_exists_plain_nxdomain(self, e: Engine) -> None:
        """No candidate exists: the first candidate's own NXDOMAIN, after asking them all once."""
        answer = e.ask(first("nothing-here"))
        assert answer.rcode() == dns.rcode.NXDOMAIN and not answer.answer
        assert [r[0] for r in records(answer, "authority")] == ["cluster.local."]
        assert len(e.upstreams.asked) == 5
        assert (e.stats.autopath_answers, e.stats.autopath_skipped) == (0, 4)

    def test_aaaa_walks_too(self, e: Engine) -> None:
        """AAAA queries are walked like A queries."""
        answer = e.ask(first("www.example.com"), "AAAA")
        assert addresses(answer) == ["2001:db8::10"]

    def test_five_dots_no_bare_name_candidate(self, e: Engine) -> None:
        """A base with ndots (5) dots or more was tried bare first by the pod: the walk does not ask it again."""
        answer = e.ask(first("a.b.c.d.e.f"))
        assert answer.rcode() == dns.rcode.NXDOMAIN
        assert "a.b.c.d.e.f." not in e.asked_names()
        assert e.asked_names()[-1] == "a.b.c.d.e.f.corp.example.net."

    def test_four_dots_bare_name_last(self, e: Engine) -> None:
        """A base with fewer than 5 dots: the bare name is the last candidate."""
        e.ask(first("a.b.c.d.e"))
        assert e.asked_names()[-1] == "a.b.c.d.e."

    def test_warm_walk_costs_nothing_and_is_a_hot_path_hit(self, e: Engine) -> None:
        """Asked again, the answer comes from the cache through the untouched hot path, no upstream query."""
        cold = e.ask(first("www.example.com"))
        e.clock.advance(2)
        asked = len(e.upstreams.asked)
        warm = e.hot_path(first("www.example.com"))
        assert warm is not None and len(e.upstreams.asked) == asked
        assert [r[3] for r in records(warm)] == [r[3] for r in records(cold)]
        assert {r[2] for r in records(warm)} == {CLUSTER_NEGATIVE_TTL - 2}

    def test_expired_answer_walked_again_from_the_cache(self, e: Engine) -> None:
        """Once the walk's answer expires, a new walk asks only the entries that expired too."""
        e.ask(first("www.example.com"))
        e.clock.advance(CLUSTER_NEGATIVE_TTL + 1)  # the cluster NXDOMAINs expired, the rest did not
        e.upstreams.asked.clear()
        answer = e.ask(first("www.example.com"))
        assert addresses(answer) == ["192.0.2.10"]
        assert e.asked_names() == [
            "www.example.com.default.svc.cluster.local.",
            "www.example.com.svc.cluster.local.",
            "www.example.com.cluster.local.",
        ]

    def test_candidates_coalesced_between_namespaces(self, e: Engine) -> None:
        """Two pods of different namespaces share the later candidates: each is asked once."""
        e.ask(first("www.example.com", "default"))
        e.ask(first("www.example.com", "other"))
        assert e.asked_names().count("www.example.com.") == 1
        assert e.asked_names().count("www.example.com.svc.cluster.local.") == 1


class TestGivesUp:
    """When the walk cannot give the pod's own answer: the plain NXDOMAIN, and the pod walks by itself."""

    def test_servfail_of_a_candidate_plain_nxdomain(self, e: Engine) -> None:
        """A candidate answered SERVFAIL: stop there, the plain NXDOMAIN of the first candidate."""
        answer = e.ask(first("broken"))
        assert answer.rcode() == dns.rcode.NXDOMAIN and not answer.answer
        assert e.asked_names()[-1] == "broken.corp.example.net."
        assert (e.stats.autopath_answers, e.stats.autopath_abandoned) == (0, 1)

    def test_walk_out_of_time_plain_nxdomain(self, e: Engine) -> None:
        """A candidate that does not answer within --autopath-timeout: the plain NXDOMAIN."""
        answer = e.ask(first("slow"))
        assert answer.rcode() == dns.rcode.NXDOMAIN and not answer.answer
        assert "slow." not in e.asked_names()
        assert e.stats.autopath_abandoned == 1

    def test_abandoned_walk_not_cached(self, e: Engine) -> None:
        """An abandoned walk stores no answer: the next query walks again."""
        e.ask(first("broken"))
        assert e.hot_path(first("broken")) is None

    def test_pod_going_on_by_itself_gets_plain_answers(self, e: Engine) -> None:
        """After a plain NXDOMAIN, the pod's next candidate is answered as it is, never walked as a first one.

        db.staging.svc.cluster.local... is deleted here: read as the first candidate of `db` in a namespace
        `staging`, a walk would find db.corp.example.net and answer an address the pod must not get.
        """
        ZONES["db.corp.example.net."] = {"A": [("A", 60, "192.0.2.99")]}
        saved = ZONES.pop("db.staging.svc.cluster.local.")
        try:
            assert e.ask(first("db.staging")).rcode() == dns.rcode.NXDOMAIN
            second = e.ask("db.staging.svc.cluster.local.")
            assert second.rcode() == dns.rcode.NXDOMAIN and not second.answer
        finally:
            ZONES["db.staging.svc.cluster.local."] = saved
            del ZONES["db.corp.example.net."]

    def test_outage_no_walk_stale_first_candidate(self, e: Engine) -> None:
        """Every upstream down and the first candidate's NXDOMAIN stale: it is answered stale, no walk."""
        e.ask(first("nothing-here"))
        e.clock.advance(3600)
        for server in e.upstreams.servers:
            server.down = True
        e.upstreams.asked.clear()
        answer = e.ask(first("nothing-here"))
        assert answer.rcode() == dns.rcode.NXDOMAIN
        assert e.outcomes[-1] == "stale"
        assert e.stats.autopath_answers == 0


class TestUntouched:
    """Queries autopath never changes: what the proxy answers without it, one upstream query."""

    @pytest.mark.parametrize("qtype", ["TXT", "MX", "SRV", "PTR", "HTTPS"])
    def test_other_types(self, e: Engine, qtype: str) -> None:
        """Only A and AAAA are walked."""
        answer = e.ask(first("www.example.com"), qtype)
        assert answer.rcode() == dns.rcode.NXDOMAIN
        assert e.asked_names() == [first("www.example.com")]

    @pytest.mark.parametrize(
        "qname",
        [
            "www.example.com.default.svc.other.local.",  # another cluster domain
            "www.example.com.cluster.local.",  # under the cluster domain, not <ns>.svc
            "default.svc.cluster.local.",  # no base
            "www.example.com.Bad_Ns.svc.cluster.local.",  # not a namespace name
            "www.example.com.default.pod.cluster.local.",
            "nothing.example.com.",
        ],
    )
    def test_other_zones(self, e: Engine, qname: str) -> None:
        """Names that are not <base>.<ns>.svc.<cluster domain> are forwarded as they are."""
        answer = e.ask(qname)
        assert answer.rcode() == dns.rcode.NXDOMAIN
        assert len(e.upstreams.asked) == 1

    def test_first_candidate_existing(self, e: Engine) -> None:
        """A first candidate that exists is its own answer, no CNAME, nothing else asked; repeated, a hot-path hit."""
        answer = e.ask(first("web"))
        assert records(answer) == [(first("web"), "A", 30, "192.0.2.20")]
        assert e.asked_names() == [first("web")]
        assert e.hot_path(first("web")) is not None

    def test_off_by_default(self) -> None:
        """Without --autopath the resolver has no walk and the first candidate is answered NXDOMAIN."""
        built = config.build_config(["--upstream", "127.0.0.1:5301"], environ={})
        assert not built.autopath
        clock = Clock()
        upstreams = TableUpstreams(clock)
        router = routing.build_router(built, structlog.get_logger(), default=upstreams)
        resolver = Resolver(built, AnswerCache(100), router, Stats(), structlog.get_logger(), timer=clock)
        assert resolver.autopath is None
        query = wire.parse_query(dns.message.make_query(first("www.example.com"), "A").to_wire())
        assert dns.message.from_wire(resolver.resolve(query, 512)[0]).rcode() == dns.rcode.NXDOMAIN
        assert len(upstreams.asked) == 1


class TestWireForm:
    """The answers autopath makes are valid DNS messages for the client that asked."""

    def test_id_flags_question_case_and_opt(self, e: Engine) -> None:
        """The client's ID and question (case as asked), QR, RD and RA set, AA never, an OPT for EDNS clients."""
        qname = "WWW.Example.COM.default.svc.cluster.local."
        answer = e.ask(qname, qid=0x1234)
        assert answer.id == 0x1234
        assert answer.question[0].name.to_text() == qname
        assert answer.flags & dns.flags.QR and answer.flags & dns.flags.RD and answer.flags & dns.flags.RA
        assert not answer.flags & dns.flags.AA and not answer.flags & dns.flags.AD
        assert answer.edns == 0 and answer.payload == wire.OUR_EDNS_PAYLOAD
        assert records(answer)[0][1] == "CNAME"

    def test_no_opt_without_edns(self, e: Engine) -> None:
        """A client without EDNS gets no OPT record."""
        answer = e.ask(first("www.example.com"), edns=False)
        assert answer.edns == -1 and addresses(answer) == ["192.0.2.10"]

    def test_truncated_over_udp_when_too_large(self, e: Engine) -> None:
        """An answer over the client's UDP size is sent empty with TC=1; over TCP it comes whole."""
        small = e.ask(first("big.example.com"), edns=False, max_size=512)
        assert small.flags & dns.flags.TC and not small.answer
        whole = e.ask(first("big.example.com"), max_size=65535)
        assert len(addresses(whole)) == 60 and records(whole)[0][1] == "CNAME"

    def test_every_entry_passes_the_cache_files_check(self, e: Engine) -> None:
        """Walk answers and raw-keyed entries are saved and loaded like any other (persist.check_record)."""
        e.ask(first("www.example.com"))
        e.ask(first("txt-only.example.com"))
        e.ask(first("web"))
        assert any(key[-1] & wire.KEY_RAW for key in e.cache)
        for key, entry in e.cache.entries():
            record = persist.Record(key, bytes(entry.wire), entry.ttl_offsets, entry.ttl, 1e9 + entry.ttl, 0)
            persist.check_record(record, 1e9)

    def test_cname_answer_names_uncompressed(self) -> None:
        """A candidate's compressed names are written out in full in the answer made (dnspython parses it)."""
        request = dns.message.make_query("alias.example.com.", "A")
        reply = dns.message.make_response(request)
        reply.answer.append(dns.rrset.from_text("alias.example.com.", 60, "IN", "CNAME", "www.example.com."))
        reply.answer.append(dns.rrset.from_text("www.example.com.", 60, "IN", "A", "198.51.100.10"))  # no 0xc0 octet
        reply.authority.append(
            dns.rrset.from_text("example.com.", 60, "IN", "SOA", "ns.example.com. h.example.com. 1 2 3 4 5")
        )
        compressed = reply.to_wire()
        question = wire.name_to_wire(first("alias.example.com")) + b"\x00\x01\x00\x01"
        made = wire.cname_answer(question, wire.name_to_wire("alias.example.com."), compressed)
        assert b"\xc0" not in made[len(question) + 14 :]  # no pointer after the CNAME's owner
        parsed = dns.message.from_wire(made)
        assert [(r[0], r[1], r[3]) for r in records(parsed)] == [
            (first("alias.example.com"), "CNAME", "alias.example.com."),
            ("alias.example.com.", "CNAME", "www.example.com."),
            ("www.example.com.", "A", "198.51.100.10"),
        ]
        assert records(parsed, "authority")[0][3] == "ns.example.com. h.example.com. 1 2 3 4 5"


class TestSearchPath:
    """Which names read as a pod's first candidate, and the candidates after it."""

    path = SearchPath("cluster.local.", ("corp.example.net.", "cluster.local.", "svc.cluster.local."))

    def test_node_domains_deduplicated_after_the_cluster_ones(self) -> None:
        """The kubelet's order: svc.<domain>, <domain>, then node domains not already in the list."""
        qname = wire.name_to_wire(first("x"))
        split = self.path.split(qname)
        assert split is not None
        names = self.path.later_candidates(qname, *split)
        assert names is not None
        assert [wire.name_to_text(name, 0) for name in names] == [
            "x.svc.cluster.local.",
            "x.cluster.local.",
            "x.corp.example.net.",
            "x.",
        ]

    def test_too_long_candidate_no_walk(self) -> None:
        """A candidate over 255 octets (clients disagree on it): no walk."""
        path = SearchPath("cluster.local.", ("b" * 60 + ".example.net.",))
        base = ".".join(["a" * 60] * 3)
        qname = wire.name_to_wire(f"{base}.default.svc.cluster.local.")
        split = path.split(qname)
        assert split is not None
        assert path.later_candidates(qname, *split) is None


class TestConfig:
    """--autopath, --autopath-timeout, --cluster-domain and --search: flags, environment, file, reload."""

    def test_defaults(self, tmp_path) -> None:
        """Off; cluster.local; the node's domains from the search line of --resolv-conf."""
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.53\nsearch Corp.Example.NET. lab.example.net\noptions ndots:1\n")
        built = config.build_config(["--resolv-conf", str(resolv)], environ={})
        assert not built.autopath and built.autopath_timeout == 1.0
        assert built.cluster_domain == "cluster.local."
        assert built.search == ("corp.example.net.", "lab.example.net.")

    def test_search_flag_wins_and_none_empties(self, tmp_path) -> None:
        """--search replaces the resolv.conf list; `none` is an empty list."""
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.53\nsearch corp.example.net\n")
        argv = ["--resolv-conf", str(resolv)]
        assert config.build_config([*argv, "--search", "a.example"], environ={}).search == ("a.example.",)
        assert config.build_config([*argv, "--search", "none"], environ={}).search == ()

    def test_environment_and_file(self, tmp_path) -> None:
        """Every setting from a KUBE_DNS_PROXY_* variable or the --config file."""
        env = {
            "KUBE_DNS_PROXY_AUTOPATH": "true",
            "KUBE_DNS_PROXY_CLUSTER_DOMAIN": "k8s.example",
            "KUBE_DNS_PROXY_SEARCH": "a.example,b.example",
            "KUBE_DNS_PROXY_AUTOPATH_TIMEOUT": "0.5",
        }
        built = config.build_config(["--upstream", "127.0.0.2"], environ=env)
        assert built.autopath and built.cluster_domain == "k8s.example." and built.autopath_timeout == 0.5
        assert built.search == ("a.example.", "b.example.")
        path = tmp_path / "proxy.yaml"
        path.write_text("autopath: true\ncluster-domain: k8s.example\nsearch: [c.example]\n")
        built = config.build_config(["--upstream", "127.0.0.2", "--config", str(path)], environ={})
        assert built.autopath and built.cluster_domain == "k8s.example." and built.search == ("c.example.",)

    @pytest.mark.parametrize("argv", [["--cluster-domain", "."], ["--search", "."], ["--autopath-timeout", "0"]])
    def test_bad_values(self, argv: list[str]) -> None:
        """A root cluster domain or search domain, or a zero budget, is a configuration error."""
        with pytest.raises(config.ConfigError):
            config.build_config(["--upstream", "127.0.0.2", *argv], environ={})

    def test_live_reloadable(self) -> None:
        """All four change without a restart."""
        assert {"autopath", "autopath_timeout", "cluster_domain", "search"} <= LIVE_FIELDS

    def test_reconfigure_turns_it_on_and_off(self, e: Engine) -> None:
        """Resolver.reconfigure swaps the walk in and out."""
        off = dataclasses.replace(e.resolver.config, autopath=False)
        e.resolver.reconfigure(off, e.resolver.router)
        assert e.resolver.autopath is None
        e.resolver.reconfigure(dataclasses.replace(off, autopath=True), e.resolver.router)
        assert e.resolver.autopath is not None

    def test_metrics_exposed(self, e: Engine) -> None:
        """The counters are Prometheus families."""
        e.ask(first("www.example.com"))
        collector = ProxyCollector(e.stats, e.cache, lambda: [e.upstreams], timer=e.clock)
        values = {family.name: family.samples[0].value for family in collector.collect() if "autopath" in family.name}
        assert values == {
            "kube_dns_proxy_autopath_answers": 1,
            "kube_dns_proxy_autopath_candidates_skipped": 3,
            "kube_dns_proxy_autopath_walks_abandoned": 0,
        }
