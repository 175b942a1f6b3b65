"""How an outage ends, specified: a down server probed often, its first reply ending the outage at once.

In-process like tests/test_outage_spec.py (whose scripted upstream and engine this reuses): no
sockets and no sleeps. FakeTime gives the greenlets a sleep on the fake clock and moves the clock
from one wake-up to the next, so the prober's schedule and the recovery refresh's pacing are
measured in fake seconds.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable

import dns.rcode
import gevent
import gevent.event
import pytest
import structlog

import config
import resolver
import routing
import upstream
import wire
from cache import TtlPolicy, entry_from_reply
from test_outage_spec import NEW_ADDRESS, OLD_ADDRESS, QNAME, TTL, Clock, Engine, addresses, ede_codes, engine

pytestmark = pytest.mark.unit


class FakeTime:
    """A sleep on the fake clock for greenlets; run_until() wakes the sleepers in time order."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sleepers: list[tuple[float, int, gevent.event.Event]] = []
        self.order = itertools.count()

    def sleep(self, seconds: float) -> None:
        wake = gevent.event.Event()
        heapq.heappush(self.sleepers, (self.clock.now + max(0.0, seconds), next(self.order), wake))
        wake.wait()

    def run_until(self, end: float) -> None:
        """Let every greenlet run until it sleeps, wake the earliest sleeper, repeat up to `end` (fake time)."""
        while True:
            for _ in range(3):
                gevent.idle()  # every greenlet that can run has run and waits again
            if not self.sleepers or self.sleepers[0][0] > end:
                self.clock.now = max(self.clock.now, end)
                return
            wake_at, _, wake = heapq.heappop(self.sleepers)
            self.clock.now = max(self.clock.now, wake_at)
            wake.set()


def record_times(e: Engine) -> list[tuple[float, str]]:
    """(fake time, qname) of every upstream try of the engine from now on."""
    times: list[tuple[float, str]] = []
    exchange = e.upstreams._exchange_udp

    def timed(server, question: bytes, do: bool, cd: bool, timeout: float) -> bytes:
        times.append((e.clock(), wire.name_to_text(question, 0)))
        return exchange(server, question, do, cd, timeout)

    e.upstreams._exchange_udp = timed  # type: ignore[method-assign]
    return times


def key_of(qname: str) -> bytes:
    return wire.parse_query(dns.message.make_query(qname, "A", use_edns=0).to_wire()).key


def outage(e: Engine, asked: dict[str, int]) -> None:
    """Cache each name, let it expire, take the upstream down, answer each name stale `asked[name]` times."""
    for qname in asked:
        e.ask(qname)
    e.clock.advance(TTL + 1)
    e.upstreams.mode = "fail"
    e.mark_down()
    for qname, times in asked.items():
        for _ in range(times):
            assert e.ask(qname)[1] == "stale"
    e.settle()  # the one background refresh of each name failed: each is marked (RFC 8767 §5)
    e.upstreams.mode = "answer"
    e.upstreams.address = NEW_ADDRESS
    e.upstreams.asked.clear()


def comes_back(e: Engine) -> None:
    """The upstream answers a probe: marked up, upstream_up runs."""
    assert e.upstreams.probe(e.upstreams.servers[0], 1.0)


# -- probes of a down server ---------------------------------------------------------------------


class TestProbes:
    """upstream.run_prober and probe_delay: a down server is asked `. NS` about every --down-probe-interval."""

    @pytest.mark.parametrize(("rand", "delay"), [(0.0, 0.4), (0.5, 0.5), (1 - 1e-12, 0.6)])
    def test_probe_delay_is_the_interval_give_or_take_a_fifth(self, rand: float, delay: float) -> None:
        """The delay is interval × (1 ± 0.2): the ends and the middle of the random range."""
        assert upstream.probe_delay(0.5, lambda: rand) == pytest.approx(delay)

    def test_probe_delays_spread_over_the_whole_jitter(self) -> None:
        """A thousand delays all lie within interval ± 20 % and cover most of it (nodes drift apart)."""
        draw = random.Random(13).random
        delays = [upstream.probe_delay(0.5, draw) for _ in range(1000)]
        assert 0.4 <= min(delays) < 0.41 and 0.59 < max(delays) <= 0.6

    def run_prober(self, e: Engine, fake: FakeTime, seconds: float, interval: float = 0.5) -> None:
        prober = gevent.spawn(
            upstream.run_prober, lambda: [e.upstreams], lambda: interval, random.Random(7).random, fake.sleep
        )
        try:
            fake.run_until(e.clock() + seconds)
        finally:
            prober.kill()

    def test_a_down_server_is_probed_every_interval_with_jitter(self) -> None:
        """While down (every probe refused), probes go out 0.4-0.6 s apart, all `. NS`."""
        e = engine()
        fake = FakeTime(e.clock)
        times = record_times(e)
        e.upstreams.mode = "fail"
        e.mark_down()
        self.run_prober(e, fake, 10.0)
        gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(times)]
        assert 16 <= len(times) <= 26
        assert all(0.4 - 1e-9 <= gap <= 0.6 + 1e-9 for gap in gaps), gaps
        assert {qname for _, qname in times} == {"."}

    def test_no_probe_while_up(self) -> None:
        """A healthy server is never probed."""
        e = engine()
        times = record_times(e)
        self.run_prober(e, FakeTime(e.clock), 5.0)
        assert times == []

    def test_one_probe_in_flight_per_server(self) -> None:
        """A probe still unanswered is never joined by a second one; its reply marks the server up and ends probing."""
        e = engine()
        fake = FakeTime(e.clock)
        reply = gevent.event.Event()
        started: list[float] = []
        answer = e.upstreams.reply

        def exchange(server, question: bytes, do: bool, cd: bool, timeout: float) -> bytes:
            started.append(e.clock())
            reply.wait()  # far longer than any probe would wait: only the loop's discipline limits them
            return answer(question)

        e.upstreams._exchange_udp = exchange  # type: ignore[method-assign]
        up: list[upstream.Server] = []
        e.upstreams.on_up = lambda upstreams, server: up.append(server)
        e.mark_down()
        prober = gevent.spawn(
            upstream.run_prober, lambda: [e.upstreams], lambda: 0.5, random.Random(7).random, fake.sleep
        )
        try:
            fake.run_until(e.clock() + 5.0)  # about ten rounds of the prober
            assert len(started) == 1
            reply.set()
            fake.run_until(e.clock() + 5.0)
        finally:
            prober.kill()
        assert len(started) == 1
        assert up == e.upstreams.servers and not e.upstreams.all_down()


# -- upstream_up: failure marks cleared ---------------------------------------------------------


class TestFailureMarks:
    """On a server's down -> up, the failure marks of the entries routed to it go."""

    def test_next_query_after_upstream_up_gets_fresh_data(self) -> None:
        """A name whose refresh failed in the outage is refreshed by its next query, not after --failure-recheck."""
        e = engine("--recovery-refresh-rate", "0")
        outage(e, {QNAME: 1})
        e.clock.advance(1.0)  # far less than --failure-recheck
        message, _ = e.ask()
        assert (addresses(message), ede_codes(message)) == ([OLD_ADDRESS], [3])  # marked: stale at once
        comes_back(e)
        message, _ = e.ask()
        assert (addresses(message), ede_codes(message)) == ([NEW_ADDRESS], [])
        assert e.upstreams.asked == [".", QNAME.lower()]  # the probe, then the client's refresh

    def test_marks_of_other_routes_stay(self) -> None:
        """Only entries routed to the servers that came back lose their marks."""
        e = engine("--forward", "example.=127.0.0.1:5302", "--recovery-refresh-rate", "0")
        zone_key = key_of("www.example.")
        question = wire.key_question_wire(zone_key)
        reply = e.upstreams.reply(question)  # stored by hand: the zone's servers are never contacted
        e.cache.store(zone_key, entry_from_reply(reply, TtlPolicy(), e.clock())[0])
        outage(e, {QNAME: 1})
        zone_entry = e.cache.get(zone_key)
        zone_entry.retry_after = e.clock() + 30
        comes_back(e)
        assert e.cache.get(key_of(QNAME)).retry_after == 0.0
        assert zone_entry.retry_after == e.clock() + 30


# -- upstream_up: the names answered stale refreshed in the background --------------------------


def recovering(*flags: str) -> tuple[Engine, FakeTime, list[tuple[float, str]]]:
    e = engine(*flags)
    fake = FakeTime(e.clock)
    e.resolver.sleep = fake.sleep
    return e, fake, record_times(e)


class TestRecoveryRefresh:
    """After upstream_up, the names answered stale in the outage are refreshed, most asked first, at a bounded rate."""

    def test_most_asked_names_refreshed_first(self) -> None:
        """The names are refreshed by their number of stale answers, most first; names not asked are not."""
        e, fake, times = recovering()
        asked = {"a.example.": 1, "b.example.": 5, "c.example.": 3, "d.example.": 0, "e.example.": 4}
        outage(e, asked)
        times.clear()
        comes_back(e)
        fake.run_until(e.clock() + 5)
        e.settle()
        assert [qname for _, qname in times] == [".", "b.example.", "e.example.", "c.example.", "a.example."]
        assert e.stats.recovery_refreshes == 4
        for qname in ("a.example.", "b.example.", "c.example.", "e.example."):
            message, outcome = e.ask(qname)
            assert (addresses(message), outcome) == ([NEW_ADDRESS], "hit")

    @pytest.mark.parametrize("rate", [20, 7])
    def test_refresh_rate_is_a_bound(self, rate: int) -> None:
        """With 100 names answered stale, at most --recovery-refresh-rate refreshes go out in any second."""
        e, fake, times = recovering("--recovery-refresh-rate", str(rate))
        outage(e, {f"n{index}.example.": 1 for index in range(100)})
        times.clear()
        comes_back(e)
        start = e.clock()
        fake.run_until(start + 100 / rate + 5)
        e.settle()
        sent = [at for at, qname in times if qname != "."]
        assert len(sent) == 100 == e.stats.recovery_refreshes
        per_second = Counter(math.floor(at - start + 1e-9) for at in sent)
        print(f"recovery refreshes per fake second at --recovery-refresh-rate {rate}: {sorted(per_second.items())}")
        assert max(per_second.values()) <= rate
        # Any window of one second, not only whole seconds: sends are 1/rate apart at least.
        assert all(later - earlier >= 1 / rate - 1e-9 for earlier, later in itertools.pairwise(sent))
        assert sent[-1] - start == pytest.approx(99 / rate)

    def test_names_fresh_again_cost_no_refresh(self) -> None:
        """A name a client refreshed first (or one in flight) is skipped: one upstream query per name."""
        e, fake, times = recovering("--recovery-refresh-rate", "1")
        outage(e, {"a.example.": 3, "b.example.": 2, "c.example.": 1})
        times.clear()
        comes_back(e)
        fake.run_until(e.clock() + 0.5)  # a.example. refreshed at once; b and c wait their turn
        for qname in ("c.example.", "b.example."):
            assert addresses(e.ask(qname)[0]) == [NEW_ADDRESS]  # the clients come first
        fake.run_until(e.clock() + 5)
        e.settle()
        assert sorted(qname for _, qname in times) == [".", "a.example.", "b.example.", "c.example."]
        assert e.stats.recovery_refreshes == 1

    def test_rate_zero_turns_the_refresh_off(self) -> None:
        """--recovery-refresh-rate 0: nothing is refreshed in the background; the marks still go."""
        e, fake, times = recovering("--recovery-refresh-rate", "0")
        outage(e, {"a.example.": 2, "b.example.": 1})
        times.clear()
        comes_back(e)
        fake.run_until(e.clock() + 5)
        assert [qname for _, qname in times] == ["."]
        assert e.resolver.stale_keys == {} and e.stats.recovery_refreshes == 0

    def test_down_again_puts_the_names_back(self) -> None:
        """If the upstream goes down again mid-refresh, the names left wait for its next return."""
        e, fake, times = recovering("--recovery-refresh-rate", "2")
        outage(e, {f"n{index}.example.": 10 - index for index in range(6)})
        times.clear()
        comes_back(e)
        fake.run_until(e.clock() + 0.9)  # n0 and n1 refreshed, 0.5 s apart
        e.mark_down()
        fake.run_until(e.clock() + 10)
        assert [qname for _, qname in times] == [".", "n0.example.", "n1.example."]
        assert sorted(e.resolver.stale_keys) == sorted(key_of(f"n{index}.example.") for index in range(2, 6))
        comes_back(e)
        fake.run_until(e.clock() + 10)
        e.settle()
        assert [qname for _, qname in times][4:] == [f"n{index}.example." for index in range(2, 6)]

    def test_names_remembered_are_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Beyond RECOVERY_NAMES distinct names, stale answers are still served but not remembered."""
        monkeypatch.setattr(resolver, "RECOVERY_NAMES", 3)
        e, fake, times = recovering()
        outage(e, {f"n{index}.example.": 1 for index in range(6)})
        assert len(e.resolver.stale_keys) == 3
        assert e.stats.stale_served == 6
        times.clear()
        comes_back(e)
        fake.run_until(e.clock() + 5)
        e.settle()
        assert len(times) == 1 + 3

    def test_pool_full_counts_a_failed_refresh(self) -> None:
        """With the background pool full, a name is skipped and counted as a failed refresh, not queued again."""
        e, fake, times = recovering()
        outage(e, {"a.example.": 1})
        e.resolver.fetch_pool.limit = 1  # the recovery task itself fills it
        times.clear()
        comes_back(e)
        fake.run_until(e.clock() + 5)
        e.resolver.fetch_pool.limit = 1000
        e.settle()
        assert [qname for _, qname in times] == ["."]
        assert e.resolver.refresh_failed_in_episode == 1


# -- the episode's log line ---------------------------------------------------------------------


def test_stale_serving_ended_reports_the_recovery() -> None:
    """stale_serving_ended keeps its fields and adds the names answered stale, the refreshes and the recovery time."""
    e, fake, _ = recovering()
    with structlog.testing.capture_logs() as logs:
        outage(e, {"a.example.": 2, "b.example.": 1})
        e.clock.advance(20)
        e.ask("a.example.")  # stale, 20 s into the outage
        comes_back(e)
        e.clock.advance(0.25)
        fake.run_until(e.clock() + 1)
        e.settle()
        e.resolver.report_stale_episode()
        e.clock.advance(5)
        e.resolver.report_stale_episode()
    ended = [line for line in logs if line["event"] == "stale_serving_ended"]
    assert len(ended) == 1
    assert ended[0]["stale_answers"] == 4 and ended[0]["duration_seconds"] == 20.0
    assert (ended[0]["names_served_stale"], ended[0]["refreshed"], ended[0]["refresh_failed"]) == (2, 2, 0)
    assert ended[0]["recovery_seconds"] == 0.0  # no stale answer after the upstream came back


def test_episode_stays_open_while_the_refresh_runs() -> None:
    """The episode's line waits for the recovery refresh, so that its figures are complete."""
    e, fake, _ = recovering("--recovery-refresh-rate", "1")
    with structlog.testing.capture_logs() as logs:
        outage(e, {f"n{index}.example.": 1 for index in range(10)})
        comes_back(e)
        fake.run_until(e.clock() + 6)  # 7 of the 10 refreshes sent
        e.resolver.report_stale_episode()
        assert [line for line in logs if line["event"] == "stale_serving_ended"] == []
        fake.run_until(e.clock() + 10)
        e.settle()
        e.resolver.report_stale_episode()
    ended = [line for line in logs if line["event"] == "stale_serving_ended"]
    assert [(line["refreshed"], line["names_served_stale"]) for line in ended] == [(10, 10)]


def test_names_stale_for_their_own_failure_are_forgotten() -> None:
    """Names answered stale while every upstream is up (a SERVFAIL of their own) leave with the episode."""
    e = engine()
    e.ask()
    e.clock.advance(TTL + 1)
    e.upstreams.mode = "servfail"
    assert e.ask()[1] == "stale"
    e.settle()
    assert e.resolver.stale_keys
    e.clock.advance(5)
    e.resolver.report_stale_episode()
    assert e.resolver.stale_keys == {}


def test_upstream_up_is_wired_through_reloads() -> None:
    """Every Upstreams of the routes, those a reload adds included, calls the resolver on down -> up."""
    e = engine()
    built = config.build_config(["--upstream", "127.0.0.1:5301", "--forward", "example.=127.0.0.1:5302"], environ={})
    router = routing.build_router(built, structlog.get_logger(), previous=e.resolver.router)
    e.resolver.reconfigure(built, router)
    hooks: list[Callable[..., None] | None] = [u.on_up for u in router.all_upstreams()]
    assert len(hooks) == 2 and all(hook == e.resolver.upstream_up for hook in hooks)
