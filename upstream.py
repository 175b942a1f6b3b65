"""Forwarding: query bytes in, reply bytes out or UpstreamError, within one deadline; upstream health.

Knows nothing of the cache. Which server is tried, for how long, and when a server counts as down
are decided here; the sockets are transport.py's (pooled UDP, reused TCP, every RFC 5452 check).
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.pool
from gevent import socket

import wire
from config import Endpoint
from transport import TcpPool, UdpPool
from transport import UpstreamError as UpstreamError  # raised by the pools, re-exported for callers

_U16 = struct.Struct("!H")
MAX_MESSAGE = 65535
FAILURES_BEFORE_DOWN = 2  # consecutive failed tries, as CoreDNS forward's max_fails default
PROBE_QUESTION = b"\x00" + struct.pack("!HH", wire.QTYPE_NS, 1)  # ". NS": cheap, any reply means alive
PROBE_JITTER = 0.2  # probes every --down-probe-interval ± 20 %: nodes that lost kube-dns together drift apart


@dataclass(eq=False)  # compared and hashed by identity: a key of the per-server pools
class Server:
    """One upstream and its health: consecutive failures, and whether it is marked down."""

    endpoint: Endpoint
    failures: int = 0
    down: bool = False
    down_since: float = 0.0
    up_since: float = -math.inf  # monotonic time it was last marked up again after being down
    probing: bool = False  # a probe loop runs for it (run_prober): one probe in flight at most

    @property
    def family(self) -> int:
        return socket.AF_INET6 if self.endpoint.family_is_v6 else socket.AF_INET

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.endpoint.host, self.endpoint.port)


class Upstreams:
    """The upstream servers of the proxy, tried healthy-first within one overall deadline."""

    def __init__(
        self,
        endpoints: tuple[Endpoint, ...],
        try_timeout: float,
        deadline: float,
        force_tcp: bool,
        log: Any,
        on_result: Callable[[Server, str, str, float], None] | None = None,
        timer: Callable[[], float] = time.monotonic,
        on_dropped: Callable[[Server, str, str], None] | None = None,
        on_up: Callable[[Upstreams, Server], None] | None = None,
    ) -> None:
        self.servers = [Server(e) for e in endpoints]
        self.try_timeout = try_timeout
        self.deadline = deadline
        self.force_tcp = force_tcp
        self.log = log
        self.on_result = on_result
        self.timer = timer  # the clock of the health marks (down_since, up_since); tests inject one
        self.on_dropped = on_dropped
        # Sockets and connections are per server and made on first use (transport.py).
        self.udp_pools: dict[Server, UdpPool] = {}
        self.tcp_pools: dict[Server, TcpPool] = {}
        # Called when a server marked down is marked up again: the resolver ends its outage there.
        self.on_up = on_up

    def all_down(self) -> bool:
        """True while every upstream is marked down: callers then answer stale or SERVFAIL at once."""
        for server in self.servers:
            if not server.down:
                return False
        return True

    def query(self, question: bytes, do: bool, cd: bool, deadline: float | None = None) -> bytes:
        """Send the question upstream and return the reply bytes (its ID is ours, not the client's).

        Tries healthy servers first, then the ones marked down; each try has its own timeout inside
        the overall deadline. Raises UpstreamError when nothing usable came back in time.
        """
        end = time.monotonic() + (self.deadline if deadline is None else deadline)
        ordered = sorted(self.servers, key=lambda s: s.down)
        reason = "timeout"
        # Two passes at most: a second chance for a lost datagram, and no spinning on instant refusals.
        for server in ordered + ordered:
            remaining = end - time.monotonic()
            if remaining <= 0.01:
                break
            try:
                return self._try(server, question, do, cd, min(self.try_timeout, remaining))
            except UpstreamError as exc:
                reason = exc.reason
        raise UpstreamError(reason)

    def _try(self, server: Server, question: bytes, do: bool, cd: bool, timeout: float) -> bytes:
        started = time.monotonic()
        protocol = "tcp" if self.force_tcp else "udp"
        try:
            if self.force_tcp:
                reply = self._exchange_tcp(server, question, do, cd, timeout)
            else:
                reply = self._exchange_udp(server, question, do, cd, timeout)
                if reply[2] & 0x02:  # TC=1: the whole answer only fits over TCP (RFC 7766 §5)
                    self._record(server, "udp", "truncated", started)
                    protocol = "tcp"
                    remaining = timeout - (time.monotonic() - started)
                    if remaining <= 0:
                        raise UpstreamError("timeout")
                    reply = self._exchange_tcp(server, question, do, cd, remaining)
        except UpstreamError as exc:
            self._failed(server, protocol, exc.reason, started)
            raise
        self._succeeded(server, protocol, reply, started)
        return reply

    def _exchange_udp(self, server: Server, question: bytes, do: bool, cd: bool, timeout: float) -> bytes:
        pool = self.udp_pools.get(server)
        if pool is None:
            pool = self.udp_pools[server] = UdpPool(server.sockaddr, server.family, self._dropper(server, "udp"))
        return pool.exchange(wire.build_upstream_query(0, question, do, cd), question, timeout)

    def _exchange_tcp(self, server: Server, question: bytes, do: bool, cd: bool, timeout: float) -> bytes:
        pool = self.tcp_pools.get(server)
        if pool is None:
            pool = self.tcp_pools[server] = TcpPool(server.sockaddr, server.family, self._dropper(server, "tcp"))
        return pool.exchange(wire.build_upstream_query(0, question, do, cd), question, timeout)

    def _dropper(self, server: Server, protocol: str) -> Callable[[str], None]:
        """What a pool calls for each reply it drops (wrong ID or question: RFC 5452 §9.1)."""

        def dropped(reason: str) -> None:
            if self.on_dropped is not None:
                self.on_dropped(server, protocol, reason)

        return dropped

    def close(self) -> None:
        """Close every pooled socket and connection (at shutdown; a later query opens new ones)."""
        for udp in self.udp_pools.values():
            udp.close()
        for tcp in self.tcp_pools.values():
            tcp.close()
        self.udp_pools.clear()
        self.tcp_pools.clear()

    def _record(self, server: Server, protocol: str, result: str, started: float) -> None:
        if self.on_result is not None:
            self.on_result(server, protocol, result, time.monotonic() - started)

    def _failed(self, server: Server, protocol: str, reason: str, started: float) -> None:
        self._record(server, protocol, reason, started)
        server.failures += 1
        if not server.down and server.failures >= FAILURES_BEFORE_DOWN:
            server.down = True
            server.down_since = self.timer()
            self.log.warning("upstream_down", upstream=str(server.endpoint), reason=reason)

    def _succeeded(self, server: Server, protocol: str, reply: bytes, started: float) -> None:
        rcode = reply[3] & 0xF
        result = "servfail" if rcode == wire.SERVFAIL else "refused" if rcode == wire.REFUSED else "ok"
        self._record(server, protocol, result, started)
        self.mark_up(server)

    def mark_up(self, server: Server) -> None:
        """Any reply means the server is alive (like CoreDNS forward's health check); down -> up calls on_up."""
        server.failures = 0
        if server.down:
            server.down = False
            server.up_since = self.timer()
            self.log.info(
                "upstream_up",
                upstream=str(server.endpoint),
                down_seconds=round(server.up_since - server.down_since, 3),
            )
            if self.on_up is not None:
                try:
                    self.on_up(self, server)
                except Exception as exc:  # another module's code: a failing hook must not undo the mark
                    self.log.error("upstream_up_hook_failed", upstream=str(server.endpoint), error=repr(exc))

    def probe(self, server: Server, timeout: float) -> bool:
        """Ask a down server `. NS` (answer content ignored); a reply marks it up."""
        question = PROBE_QUESTION
        try:
            if self.force_tcp:
                self._exchange_tcp(server, question, False, False, timeout)
            else:
                self._exchange_udp(server, question, False, False, timeout)
        except UpstreamError:
            return False
        self.mark_up(server)
        return True


def probe_delay(interval: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds from one probe of a down server to the next: `interval` ± PROBE_JITTER, uniformly.

    rand: a number in [0, 1), random.random unless a test injects one.
    """
    return interval * (1.0 + PROBE_JITTER * (2.0 * rand() - 1.0))


def run_prober(
    upstream_groups: Callable[[], Iterable[Upstreams]],
    interval: Callable[[], float],
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], None] = gevent.sleep,
) -> None:
    """Forever: probe each server marked down about every interval() seconds, one probe in flight per server.

    Apart from RFC 8767's per-entry failure recheck (--failure-recheck): a probe is one cheap `. NS`
    per server, not per name, so it can be frequent, and the first reply marks the server up (and
    ends the outage, through Upstreams.on_up) within about one interval of kube-dns answering again.
    Each down server gets its own loop, whose probe gives up when the next is due: so at most one is
    in flight, and a probe lost in a silent outage (no ICMP, only timeouts) never delays the next.
    Both are callables: a reload swaps the groups (--forward) and the interval (--down-probe-interval).
    rand and sleep: the jitter's random numbers and the wait, injected by tests with a fake clock.
    """
    loops = gevent.pool.Group()
    try:
        while True:
            for upstreams in upstream_groups():
                for server in upstreams.servers:
                    if server.down and not server.probing:
                        server.probing = True
                        loops.spawn(_probe_while_down, upstreams, server, upstream_groups, interval, rand, sleep)
            sleep(probe_delay(interval(), rand))
    finally:
        loops.kill(block=False)


def _probe_while_down(
    upstreams: Upstreams,
    server: Server,
    upstream_groups: Callable[[], Iterable[Upstreams]],
    interval: Callable[[], float],
    rand: Callable[[], float],
    sleep: Callable[[float], None],
) -> None:
    """Probe one server until it is up (or no longer configured), one probe every probe_delay()."""
    try:
        while server.down and any(server is s for group in upstream_groups() for s in group.servers):
            delay = probe_delay(interval(), rand)
            started = upstreams.timer()
            if upstreams.probe(server, min(upstreams.try_timeout, delay)):
                return
            sleep(max(0.0, started + delay - upstreams.timer()))
    finally:
        server.probing = False
