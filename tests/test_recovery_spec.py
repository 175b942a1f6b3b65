"""How an outage ends, specified: a down server probed often, its first reply ending the outage at once.

In-process like tests/test_outage_spec.py (whose scripted upstream and engine this reuses): no
sockets and no sleeps. FakeTime gives the greenlets a sleep on the fake clock and moves the clock
from one wake-up to the next, so the prober's schedule and the recovery refresh's pacing are
measured in fake seconds.
"""

from __future__ import annotations

import heapq
import itertools
import random

import gevent
import gevent.event
import pytest

import upstream
import wire
from test_outage_spec import Clock, Engine, engine

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
