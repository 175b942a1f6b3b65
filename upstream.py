"""Forwarding: query bytes in, reply bytes out or UpstreamError, within one deadline; upstream health.

Knows nothing of the cache. Spoofing resilience per RFC 5452: a fresh socket (random source port)
and a random ID per try, and a reply is taken only from the server asked, with our ID and our question.
"""

from __future__ import annotations

import errno
import math
import random
import secrets
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

_U16 = struct.Struct("!H")
MAX_MESSAGE = 65535
FAILURES_BEFORE_DOWN = 2  # consecutive failed tries, as CoreDNS forward's max_fails default
PROBE_QUESTION = b"\x00" + struct.pack("!HH", wire.QTYPE_NS, 1)  # ". NS": cheap, any reply means alive
PROBE_JITTER = 0.2  # probes every --down-probe-interval ± 20 %: nodes that lost kube-dns together drift apart


class UpstreamError(Exception):
    """No usable reply from any upstream before the deadline; `reason` is a short word for logs and metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
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
        on_up: Callable[[Upstreams, Server], None] | None = None,
    ) -> None:
        self.servers = [Server(e) for e in endpoints]
        self.try_timeout = try_timeout
        self.deadline = deadline
        self.force_tcp = force_tcp
        self.log = log
        self.on_result = on_result
        self.timer = timer  # the clock of the health marks (down_since, up_since); tests inject one
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
        qid = secrets.randbits(16)
        query = wire.build_upstream_query(qid, question, do, cd)
        end = time.monotonic() + timeout
        sock = socket.socket(server.family, socket.SOCK_DGRAM)
        try:
            # connect(): the kernel drops datagrams from any other address or port (RFC 5452 §9.1).
            sock.connect(server.sockaddr)
            sock.send(query)
            while True:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise UpstreamError("timeout")
                sock.settimeout(remaining)
                try:
                    reply = sock.recv(MAX_MESSAGE)
                except TimeoutError:
                    raise UpstreamError("timeout") from None
                if _matches(reply, qid, question):
                    return reply
                # A reply with another ID or question is ignored; keep waiting (RFC 5452 §9.1).
        except OSError as exc:
            raise UpstreamError(_os_reason(exc)) from None
        finally:
            sock.close()

    def _exchange_tcp(self, server: Server, question: bytes, do: bool, cd: bool, timeout: float) -> bytes:
        qid = secrets.randbits(16)
        query = wire.build_upstream_query(qid, question, do, cd)
        end = time.monotonic() + timeout
        sock = socket.socket(server.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(server.sockaddr)
            sock.sendall(_U16.pack(len(query)) + query)
            while True:
                length = _U16.unpack(recv_exact(sock, 2, end))[0]
                reply = recv_exact(sock, length, end)
                if _matches(reply, qid, question):
                    return reply
        except TimeoutError:
            raise UpstreamError("timeout") from None
        except EOFError:
            raise UpstreamError("closed") from None
        except OSError as exc:
            raise UpstreamError(_os_reason(exc)) from None
        finally:
            sock.close()

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


def recv_exact(sock: Any, size: int, deadline: float) -> bytes:
    """Exactly size bytes of a stream before the monotonic deadline (DNS over TCP framing, RFC 7766).

    Raises TimeoutError when the deadline passes and EOFError when the peer closes midway.
    """
    chunks = []
    while size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("message not complete in time")
        sock.settimeout(remaining)
        chunk = sock.recv(size)
        if not chunk:
            raise EOFError("closed mid-message")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _matches(reply: bytes, qid: int, question: bytes) -> bool:
    """A reply is ours only with QR=1, our ID and our question, compared case-insensitively."""
    if len(reply) < 12 + len(question) or _U16.unpack_from(reply, 0)[0] != qid or not reply[2] & 0x80:
        return False
    if _U16.unpack_from(reply, 4)[0] != 1:
        return False
    asked = reply[12 : 12 + len(question)]
    return asked[:-4].lower() == question[:-4].lower() and asked[-4:] == question[-4:]


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "connection_refused" if exc.errno == errno.ECONNREFUSED else "unreachable"
    return "error"
