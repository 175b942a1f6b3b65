"""The query engine specified row by row: resolver.Resolver in-process, a fake clock, a scripted upstream.

No sockets and no sleeps: the cache's clock is moved by hand, and the upstream is upstream.Upstreams
with its exchange replaced by a script (answer, NXDOMAIN, NODATA, SERVFAIL, REFUSED, fail, hang), so
its health marking (two failures mark a server down, any reply marks it up) is the real one. The
only real time spent is the few tens of milliseconds of the client timer and the try timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.edns
import dns.message
import dns.rcode
import dnslib
import gevent
import gevent.event
import pytest
import structlog

import config
import routing
import wire
from cache import AnswerCache
from conftest import Clock
from metrics import Stats
from resolver import DOWN_TRIES_PER_SECOND, Resolver
from upstream import UpstreamError, Upstreams

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parent.parent / "README.md"
QNAME = "web.default.svc.cluster.local."
OLD_ADDRESS = "192.0.2.1"
NEW_ADDRESS = "192.0.2.2"
TTL = 60
STALE_ANSWER_TIMEOUT = 0.02  # real seconds: the client timer is a gevent wait
TRY_TIMEOUT = 1.0  # real seconds, spent only by a "hang" that the test never releases


class ScriptedUpstreams(Upstreams):
    """Upstreams whose exchange answers from a script instead of a socket."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(
            (config.parse_endpoint("127.0.0.1:5301"),),
            TRY_TIMEOUT,
            4 * TRY_TIMEOUT,
            False,
            structlog.get_logger(),
            timer=clock,
        )
        self.mode = "answer"
        self.address = OLD_ADDRESS
        self.ttl = TTL
        self.negative_ttl = 30  # the SOA's TTL and MINIMUM of negative answers
        self.asked: list[str] = []
        self.release = gevent.event.Event()  # ends a "hang": the reply then follows the script again

    def _exchange_udp(self, server, question: bytes, do: bool, cd: bool, timeout: float) -> bytes:
        self.asked.append(wire.name_to_text(question, 0))
        if self.mode == "hang":
            if not self.release.wait(timeout):
                raise UpstreamError("timeout")
            self.release.clear()
        if self.mode == "fail":
            raise UpstreamError("connection_refused")
        return self.reply(question)

    _exchange_tcp = _exchange_udp

    def reply(self, question: bytes) -> bytes:
        request = dnslib.DNSRecord.parse(wire.build_upstream_query(0x4242, question, False, False))
        reply = request.reply()
        qname = str(request.q.qname)
        if self.mode == "servfail":
            reply.header.rcode = dnslib.RCODE.SERVFAIL
        elif self.mode == "refused":
            reply.header.rcode = dnslib.RCODE.REFUSED
        elif self.mode in ("nxdomain", "nodata", "nodata-without-soa"):
            if self.mode == "nxdomain":
                reply.header.rcode = dnslib.RCODE.NXDOMAIN
            if self.mode != "nodata-without-soa":
                soa = dnslib.SOA(
                    "ns.cluster.local.", "hostmaster.cluster.local.", (1, 7200, 1800, 86400, self.negative_ttl)
                )
                reply.add_auth(dnslib.RR("cluster.local.", dnslib.QTYPE.SOA, rdata=soa, ttl=self.negative_ttl))
        else:
            reply.add_answer(dnslib.RR(qname, dnslib.QTYPE.A, rdata=dnslib.A(self.address), ttl=self.ttl))
        return reply.pack()


@dataclass
class Engine:
    """A Resolver with its clock, cache, stats and scripted upstream."""

    clock: Clock
    upstreams: ScriptedUpstreams
    resolver: Resolver
    cache: AnswerCache
    stats: Stats
    answers: list[tuple[dns.message.Message, str]] = field(default_factory=list)

    def ask(self, qname: str = QNAME, qtype: str = "A") -> tuple[dns.message.Message, str]:
        """Resolve one EDNS query through the full path; the parsed answer and its outcome."""
        query = wire.parse_query(dns.message.make_query(qname, qtype, use_edns=0).to_wire())
        answer, outcome = self.resolver.resolve(query, 1232)
        self.answers.append((dns.message.from_wire(answer), outcome))
        return self.answers[-1]

    def settle(self) -> None:
        """Let the background refreshes finish (they run in greenlets of the resolver's pool)."""
        assert self.resolver.fetch_pool.join(timeout=2)

    def mark_down(self) -> None:
        for server in self.upstreams.servers:
            server.down = True


def engine(*flags: str) -> Engine:
    clock = Clock()
    built = config.build_config(
        [
            "--upstream",
            "127.0.0.1:5301",  # never contacted: ScriptedUpstreams answers
            "--stale-answer-timeout",
            str(STALE_ANSWER_TIMEOUT),
            "--upstream-timeout",
            str(TRY_TIMEOUT),
            "--deadline",
            str(4 * TRY_TIMEOUT),
            *flags,
        ],
        environ={},
    )
    upstreams = ScriptedUpstreams(clock)
    cache = AnswerCache(built.cache_size)
    stats = Stats()
    router = routing.build_router(built, structlog.get_logger(), default=upstreams)
    resolver = Resolver(built, cache, router, stats, structlog.get_logger(), timer=clock)
    return Engine(clock, upstreams, resolver, cache, stats)


@pytest.fixture
def fresh_engine() -> Iterator[Engine]:
    built = engine()
    yield built
    built.resolver.fetch_pool.kill()


def addresses(message: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in message.answer for rd in rrset)


def ttls(message: dns.message.Message) -> set[int]:
    return {rrset.ttl for rrset in message.answer}


def ede_codes(message: dns.message.Message) -> list[int]:
    return [option.code for option in message.options if option.otype == dns.edns.OptionType.EDE]


# -- README, "How the cache behaves in an outage", one row per case -------------------------------


@dataclass(frozen=True)
class Row:
    """One situation of the README table and what the client gets."""

    cached: str  # "none", "fresh" or "stale": the entry for QNAME when the query arrives
    upstream: str  # the script: answer, nxdomain, servfail, refused, fail, hang
    known_down: bool = False  # every upstream marked down
    recently_failed: bool = False  # a refresh of this entry failed less than --failure-recheck ago
    rcode: int = dns.rcode.NOERROR
    address: str | None = None  # the A record answered; None: no answer record
    ttl: int | None = None
    stale: bool = False  # EDE 3 "Stale Answer" and TTL --stale-ttl
    asked_before_answer: int = 0  # upstream queries sent before the answer went out
    asked_in_all: int = 0  # ... and once the background refreshes are done
    cached_after: str | None = None  # the address the cache holds afterwards


ROWS = {
    "fresh: from the cache, TTL counting down, upstream not asked": Row(
        "fresh", "answer", address=OLD_ADDRESS, ttl=TTL - 10, cached_after=OLD_ADDRESS
    ),
    "stale, healthy: a fresh NOERROR replaces the entry": Row(
        "stale", "answer", address=NEW_ADDRESS, ttl=TTL, asked_before_answer=1, asked_in_all=1, cached_after=NEW_ADDRESS
    ),
    "stale, healthy: a fresh NXDOMAIN replaces the entry": Row(
        "stale", "nxdomain", rcode=dns.rcode.NXDOMAIN, asked_before_answer=1, asked_in_all=1, cached_after="NXDOMAIN"
    ),
    "stale, healthy: SERVFAIL upstream, stale answered": Row(
        "stale", "servfail", address=OLD_ADDRESS, stale=True, asked_before_answer=1, asked_in_all=1
    ),
    "stale, healthy: REFUSED upstream, stale answered": Row(
        "stale", "refused", address=OLD_ADDRESS, stale=True, asked_before_answer=1, asked_in_all=1
    ),
    "stale, healthy: the upstream fails, stale answered": Row(
        "stale", "fail", address=OLD_ADDRESS, stale=True, asked_before_answer=2, asked_in_all=2
    ),
    "stale, healthy: no answer within the client timer, stale answered, refresh goes on": Row(
        "stale",
        "hang",
        address=OLD_ADDRESS,
        stale=True,
        asked_before_answer=1,
        asked_in_all=1,
        cached_after=NEW_ADDRESS,
    ),
    "stale, known down: stale at once, one background refresh": Row(
        "stale", "answer", known_down=True, address=OLD_ADDRESS, stale=True, asked_in_all=1, cached_after=NEW_ADDRESS
    ),
    "stale, refresh failed recently: stale at once, no refresh before the recheck": Row(
        "stale", "answer", recently_failed=True, address=OLD_ADDRESS, stale=True, cached_after=OLD_ADDRESS
    ),
    "nothing cached, healthy: forwarded": Row(
        "none", "answer", address=NEW_ADDRESS, ttl=TTL, asked_before_answer=1, asked_in_all=1, cached_after=NEW_ADDRESS
    ),
    "nothing cached, healthy: SERVFAIL when nothing usable comes back": Row(
        "none", "fail", rcode=dns.rcode.SERVFAIL, asked_before_answer=2, asked_in_all=2
    ),
    "nothing cached, known down: SERVFAIL at once, one background try": Row(
        "none", "answer", known_down=True, rcode=dns.rcode.SERVFAIL, asked_in_all=1, cached_after=NEW_ADDRESS
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_outage_table(row: Row) -> None:
    """Each row of the README's outage table: the answer, its TTL, and what was asked upstream."""
    e = engine()
    try:
        if row.cached != "none":
            e.ask()  # cached as OLD_ADDRESS, TTL 60
            e.clock.advance(10 if row.cached == "fresh" else TTL + 3600)
        e.upstreams.address = NEW_ADDRESS
        e.upstreams.mode = row.upstream
        e.upstreams.asked.clear()
        if row.known_down:
            e.mark_down()
        if row.recently_failed:
            entry = e.cache.lookup(wire.parse_query(dns.message.make_query(QNAME, "A").to_wire()).key)
            assert entry is not None
            entry.retry_after = e.clock() + e.resolver.config.failure_recheck

        message, outcome = e.ask()
        asked_before_answer = len(e.upstreams.asked)
        if row.upstream == "hang":
            e.upstreams.mode = "answer"
            e.upstreams.release.set()  # the upstream answers after all, after the client timer
        e.settle()

        assert message.rcode() == row.rcode
        assert addresses(message) == ([row.address] if row.address else [])
        if row.stale:
            assert ttls(message) == {e.resolver.config.stale_ttl}
            assert ede_codes(message) == [3]
            assert outcome == "stale"
        else:
            assert 3 not in ede_codes(message)
            if row.ttl is not None:
                assert ttls(message) == {row.ttl}
        if row.rcode == dns.rcode.SERVFAIL:
            assert ede_codes(message) == [22]  # No Reachable Authority (RFC 8914)
        assert (asked_before_answer, len(e.upstreams.asked)) == (row.asked_before_answer, row.asked_in_all)
        if row.cached_after is not None:
            again, _ = e.ask()
            held = "NXDOMAIN" if again.rcode() == dns.rcode.NXDOMAIN else addresses(again)[0]
            assert held == row.cached_after
    finally:
        e.resolver.fetch_pool.kill()


def test_readme_table_rows_all_covered() -> None:
    """Every situation of the README's outage table has rows here."""
    table = README.read_text().split("## How the cache behaves in an outage", 1)[1].split("\n\n", 2)[1]
    situations = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    covered = {
        "entry fresh": "fresh:",
        "entry stale, upstream healthy": "stale, healthy:",
        "entry stale, upstream known down (or a refresh of this entry failed less than `--failure-recheck` ago)": (
            "stale, known down:",
            "stale, refresh failed recently:",
        ),
        "nothing cached, upstream healthy": "nothing cached, healthy:",
        "nothing cached, upstream known down": "nothing cached, known down:",
        "upstream answers again": None,  # test_upstream_answers_again
    }
    assert situations == list(covered)
    for prefixes in covered.values():
        for prefix in (prefixes,) if isinstance(prefixes, str) else prefixes or ():
            assert any(row_id.startswith(prefix) for row_id in ROWS), prefix


def test_upstream_answers_again(fresh_engine: Engine) -> None:
    """After an outage, the first query of each name past the recheck gets fresh data; upstream_up is logged."""
    e = fresh_engine
    e.ask()
    e.clock.advance(TTL + 1)
    e.upstreams.mode = "fail"
    with structlog.testing.capture_logs() as logs:
        assert e.ask()[1] == "stale"  # two failed tries: marked down
        assert e.upstreams.all_down()
        e.upstreams.mode = "answer"
        e.upstreams.address = NEW_ADDRESS
        e.clock.advance(e.resolver.config.failure_recheck)
        e.ask()  # known down, past the recheck: stale at once, one background refresh ...
        e.settle()
        message, outcome = e.ask()  # ... whose answer ended the outage
    assert (addresses(message), outcome) == ([NEW_ADDRESS], "hit")
    assert not e.upstreams.all_down()
    assert [line["event"] for line in logs if line["event"].startswith("upstream_")] == ["upstream_down", "upstream_up"]


def test_known_down_misses_go_upstream_a_few_a_second(fresh_engine: Engine) -> None:
    """With every upstream down, at most DOWN_TRIES_PER_SECOND misses a second are still forwarded."""
    e = fresh_engine
    e.mark_down()
    e.upstreams.mode = "fail"
    for index in range(3 * DOWN_TRIES_PER_SECOND):
        assert e.ask(f"n{index}.example.")[0].rcode() == dns.rcode.SERVFAIL
    e.settle()
    assert len(e.upstreams.asked) == 2 * DOWN_TRIES_PER_SECOND  # two tries each
    e.clock.advance(1.0)
    e.ask("later.example.")
    e.settle()
    assert len(e.upstreams.asked) == 2 * DOWN_TRIES_PER_SECOND + 2


# -- beyond the table ------------------------------------------------------------------------------


def test_identical_misses_share_one_upstream_query(fresh_engine: Engine) -> None:
    """Twenty clients asking one uncached name at once cause one upstream query and all get its answer."""
    e = fresh_engine
    e.upstreams.mode = "hang"
    clients = [gevent.spawn(e.ask) for _ in range(20)]
    gevent.idle()  # every client is now waiting on the one fetch
    e.upstreams.mode = "answer"
    e.upstreams.release.set()
    gevent.joinall(clients, timeout=2, raise_error=True)
    assert len(e.upstreams.asked) == 1
    assert all(addresses(client.value[0]) == [OLD_ADDRESS] for client in clients)
    assert e.stats.coalesced == 19


def test_identical_stale_refreshes_share_one_upstream_query(fresh_engine: Engine) -> None:
    """Clients asking one stale name at once share one refresh."""
    e = fresh_engine
    e.ask()
    e.clock.advance(TTL + 1)
    e.upstreams.mode = "hang"
    e.upstreams.asked.clear()
    clients = [gevent.spawn(e.ask) for _ in range(10)]
    gevent.joinall(clients, timeout=2, raise_error=True)
    assert len(e.upstreams.asked) == 1
    assert all(client.value[1] == "stale" for client in clients)


def test_fresh_ttl_counts_down_in_whole_seconds(fresh_engine: Engine) -> None:
    """A fresh answer's TTL is the stored TTL less the whole seconds elapsed, rounded up."""
    e = fresh_engine
    e.ask()
    for elapsed, expected in ((0.0, 60), (0.4, 60), (1.0, 59), (58.5, 2), (59.9, 1)):
        e.clock.now = 1000.0 + elapsed
        message, outcome = e.ask()
        assert (ttls(message), outcome) == ({expected}, "hit")
    e.clock.now = 1000.0 + 60
    assert e.ask()[1] == "stale"


@pytest.mark.parametrize(
    ("mode", "negative_ttl", "max_negative_ttl", "cached_for"),
    [
        ("nxdomain", 30, 1800, 30),
        ("nodata", 30, 1800, 30),
        ("nxdomain", 3600, 600, 600),
        ("nodata-without-soa", 30, 1800, 0),
    ],
)
def test_negative_answers_cached_for_the_soa_minimum(mode, negative_ttl, max_negative_ttl, cached_for) -> None:
    """NXDOMAIN and NODATA live min(SOA TTL, SOA MINIMUM, --max-negative-ttl); never without an SOA (RFC 2308)."""
    e = engine("--max-negative-ttl", str(max_negative_ttl))
    e.upstreams.mode = mode
    e.upstreams.negative_ttl = negative_ttl
    first, outcome = e.ask()
    assert outcome == "miss"
    e.clock.advance(cached_for - 0.5)
    _, outcome = e.ask()
    assert outcome == ("hit" if cached_for else "miss")
    if cached_for:
        e.clock.advance(1.0)
        assert e.ask()[1] == "stale"


def test_max_stale_ends_stale_serving() -> None:
    """--max-stale N: an entry is served stale up to N seconds past expiry, then the client gets SERVFAIL."""
    e = engine("--max-stale", "100")
    e.ask()
    e.upstreams.mode = "fail"
    e.mark_down()
    e.clock.advance(TTL + 99)
    assert e.ask()[1] == "stale"
    e.clock.advance(2)
    message, outcome = e.ask()
    assert (message.rcode(), outcome) == (dns.rcode.SERVFAIL, "miss")


def test_max_stale_zero_turns_stale_off() -> None:
    """--max-stale 0: an expired entry is never served; a failing upstream means SERVFAIL."""
    e = engine("--max-stale", "0")
    e.ask()
    e.clock.advance(TTL)
    e.upstreams.mode = "fail"
    assert e.ask()[0].rcode() == dns.rcode.SERVFAIL


def test_stale_entries_never_expire_by_age(fresh_engine: Engine) -> None:
    """A year past expiry, with the default --max-stale, the entry is still there and served."""
    e = fresh_engine
    e.ask()
    e.upstreams.mode = "fail"
    e.mark_down()
    e.clock.advance(365 * 86400)
    message, outcome = e.ask()
    assert (addresses(message), outcome) == ([OLD_ADDRESS], "stale")


def test_stale_ttl_flag() -> None:
    """--stale-ttl sets the TTL of stale answers."""
    e = engine("--stale-ttl", "7")
    e.ask()
    e.upstreams.mode = "fail"
    e.mark_down()
    e.clock.advance(TTL + 1)
    assert ttls(e.ask()[0]) == {7}


def test_prefetch_refreshes_a_popular_entry_before_it_expires() -> None:
    """--prefetch 3: the third hit within the last 10 % of the TTL refreshes the entry once, in the background."""
    e = engine("--prefetch", "3")
    e.ask()
    e.upstreams.address = NEW_ADDRESS
    e.upstreams.asked.clear()
    e.clock.advance(TTL - 5)  # in the last 10 %
    for _ in range(5):
        e.ask()
    e.settle()
    assert len(e.upstreams.asked) == 1
    assert e.stats.prefetches == 1
    e.clock.advance(6)  # past the old entry's expiry: the prefetched one is fresh
    message, outcome = e.ask()
    assert (addresses(message), outcome) == ([NEW_ADDRESS], "hit")


def test_no_prefetch_early_in_the_ttl() -> None:
    """Hits early in an entry's TTL never prefetch."""
    e = engine("--prefetch", "1")
    e.ask()
    e.upstreams.asked.clear()
    for _ in range(10):
        e.ask()
    e.settle()
    assert e.upstreams.asked == []


@pytest.mark.parametrize(
    ("prefer_positive", "back_for", "answered"),
    [
        (True, 5, OLD_ADDRESS),  # just came back: the positive answer is held
        (True, 60, "NXDOMAIN"),  # past --prefer-positive-grace: the NXDOMAIN is believed
        (False, 5, "NXDOMAIN"),  # off: RFC 8767 as it is
    ],
)
def test_prefer_positive(prefer_positive: bool, back_for: float, answered: str) -> None:
    """--prefer-positive: a negative answer right after an outage does not replace the positive one we hold."""
    e = engine(*(["--prefer-positive"] if prefer_positive else []), "--prefer-positive-grace", "30")
    e.ask()
    e.clock.advance(TTL + 1)
    e.upstreams.mode = "fail"
    e.ask()  # marked down, served stale
    e.upstreams.mode = "nxdomain"
    e.upstreams.mark_up(e.upstreams.servers[0])
    e.clock.advance(back_for)
    for entry_key in list(e.cache):
        e.cache[entry_key].retry_after = 0.0  # past the failure recheck
    message, _ = e.ask()
    held = "NXDOMAIN" if message.rcode() == dns.rcode.NXDOMAIN else addresses(message)[0]
    assert held == answered
    assert e.stats.negative_held == (1 if answered == OLD_ADDRESS else 0)


def test_invalid_names_answered_locally(fresh_engine: Engine) -> None:
    """Names under invalid. get NXDOMAIN without an upstream query (RFC 6761 §6.4)."""
    e = fresh_engine
    message, outcome = e.ask("health.kube-dns-proxy.invalid.")
    assert (message.rcode(), outcome, e.upstreams.asked) == (dns.rcode.NXDOMAIN, "local", [])


def test_stale_episode_logged_once() -> None:
    """A stale-serving episode is one started line and one ended line, however many stale answers."""
    e = engine()
    e.ask()
    e.mark_down()
    e.clock.advance(TTL + 1)
    with structlog.testing.capture_logs() as logs:
        for _ in range(30):
            e.ask()
        e.resolver.report_stale_episode()
        e.clock.advance(5)
        e.resolver.report_stale_episode()
    events = [line["event"] for line in logs if line["event"].startswith("stale_serving")]
    assert events == ["stale_serving_started", "stale_serving_ended"]
    assert [line["stale_answers"] for line in logs if line["event"] == "stale_serving_ended"] == [30]
    assert e.stats.stale_max_age == 0.0  # reset when the episode ends


def test_failed_refresh_answers_stale_at_once_until_the_recheck(fresh_engine: Engine) -> None:
    """After a refresh failed (SERVFAIL), the next queries get stale at once; the upstream is asked again only
    after --failure-recheck (RFC 8767 §5)."""
    e = fresh_engine
    e.ask()
    e.clock.advance(TTL + 1)
    e.upstreams.mode = "servfail"  # a reply: the server stays up, only this name fails
    e.upstreams.asked.clear()
    assert e.ask()[1] == "stale"
    for _ in range(5):
        assert e.ask()[1] == "stale"
    e.settle()
    assert len(e.upstreams.asked) == 1
    e.clock.advance(e.resolver.config.failure_recheck)
    e.upstreams.mode = "answer"
    e.upstreams.address = NEW_ADDRESS
    message, _ = e.ask()
    assert (addresses(message), len(e.upstreams.asked)) == ([NEW_ADDRESS], 2)
