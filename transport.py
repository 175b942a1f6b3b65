"""Transport to one upstream server: pooled connected UDP sockets and reused, pipelined TCP connections.

Per server, a few long-lived UDP sockets, each on its own random source port and with one reader
greenlet that hands each reply to the query waiting for it by (ID, question). A socket is retired
after a bounded number of queries or seconds, so the source ports keep changing (RFC 5452 §9.2),
and the node keeps one conntrack entry per socket instead of one per cache miss. Over TCP, a few
connections are kept open and pipelined (RFC 7766 §6.2.1): several queries in flight on one
connection, answers matched out of order by ID, closed after an idle time (as CoreDNS's forward
`expire`), and opened anew when the server closes one.

Every RFC 5452 check stays: connect() makes the kernel drop datagrams from any other address or
port; IDs are random and never twice in flight on one socket or connection; a reply is taken only
with QR=1, our ID and our question (case-insensitive). Anything else is dropped and counted.
"""

from __future__ import annotations

import errno
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock
from gevent import socket

_U16 = struct.Struct("!H")
MAX_MESSAGE = 65535
UDP_POOL_SIZE = 4  # sockets per server: the bound on conntrack entries toward it
UDP_MAX_QUERIES = 5000  # a socket is retired after this many queries ...
UDP_MAX_AGE = 60.0  # ... or this many seconds, whichever comes first
UDP_RECEIVE_BUFFER = 1024 * 1024
TCP_MAX_CONNECTIONS = 4  # per server
TCP_PIPELINE = 64  # queries in flight on one connection before another one is opened
TCP_IDLE_CLOSE = 10.0  # seconds without a query in flight (CoreDNS forward's expire default)
RETIRED_GRACE = 5.0  # a retired socket keeps reading this long for answers still on their way


class UpstreamError(Exception):
    """No usable reply from the upstream; `reason` is a short word for logs and metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


DroppedReply = Callable[[str], None]  # called with the reason a reply was not used


def matches(reply: bytes, qid: int, question: bytes) -> bool:
    """A reply is ours only with QR=1, our ID and our question, compared case-insensitively."""
    if len(reply) < 12 + len(question) or _U16.unpack_from(reply, 0)[0] != qid or not reply[2] & 0x80:
        return False
    if _U16.unpack_from(reply, 4)[0] != 1:
        return False
    asked = reply[12 : 12 + len(question)]
    return asked[:-4].lower() == question[:-4].lower() and asked[-4:] == question[-4:]


def os_reason(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED:
        return "connection_refused"
    if exc.errno in (errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return "error"


class _Waiters:
    """Queries in flight on one socket or connection, by ID; IDs are random and never reused in flight."""

    __slots__ = ("by_id",)

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[bytes, gevent.event.AsyncResult]] = {}

    def add(self, question: bytes) -> tuple[int, gevent.event.AsyncResult]:
        by_id = self.by_id
        qid = secrets.randbits(16)
        while qid in by_id:
            qid = secrets.randbits(16)
        waiter = gevent.event.AsyncResult()
        by_id[qid] = (question, waiter)
        return qid, waiter

    def deliver(self, reply: bytes, dropped: DroppedReply) -> None:
        """Hand a reply to the query it answers, or drop it (RFC 5452 §9.1)."""
        if len(reply) < 12:
            dropped("short")
            return
        qid = _U16.unpack_from(reply, 0)[0]
        pending = self.by_id.get(qid)
        if pending is None:
            dropped("id")
            return
        if not matches(reply, qid, pending[0]):
            dropped("question")
            return
        del self.by_id[qid]
        pending[1].set(reply)

    def fail_all(self, reason: str) -> None:
        waiting = list(self.by_id.values())
        self.by_id.clear()
        for _, waiter in waiting:
            waiter.set_exception(UpstreamError(reason))


def _wait(waiters: _Waiters, qid: int, waiter: gevent.event.AsyncResult, timeout: float) -> bytes:
    """The reply for qid within timeout seconds; UpstreamError otherwise (the ID is freed either way)."""
    try:
        reply: bytes = waiter.get(timeout=timeout)
        return reply
    except gevent.Timeout:
        raise UpstreamError("timeout") from None
    finally:
        waiters.by_id.pop(qid, None)


class _UdpSocket:
    """One connected UDP socket with its reader greenlet."""

    def __init__(self, sockaddr: tuple[str, int], family: int, dropped: DroppedReply) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
            # The kernel picks a random free source port and drops datagrams from anyone else.
            self.sock.connect(sockaddr)
        except OSError:
            self.sock.close()
            raise
        self.waiters = _Waiters()
        self.dropped = dropped
        self.queries = 0
        self.born = time.monotonic()
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        recv = self.sock.recv
        waiters = self.waiters
        while True:
            try:
                reply = recv(MAX_MESSAGE)
            except OSError as exc:
                if self.sock.fileno() < 0:
                    return  # closed
                # An ICMP error (port unreachable) is the socket's, not one query's: every query
                # on it fails now, as a fresh socket per query would have failed.
                waiters.fail_all(os_reason(exc))
                continue
            waiters.deliver(reply, self.dropped)

    def exchange(self, query: bytes, question: bytes, timeout: float) -> bytes:
        qid, waiter = self.waiters.add(question)
        self.queries += 1
        try:
            self.sock.send(_U16.pack(qid) + query[2:])
        except OSError as exc:
            self.waiters.by_id.pop(qid, None)
            raise UpstreamError(os_reason(exc)) from None
        return _wait(self.waiters, qid, waiter, timeout)

    def close(self) -> None:
        self.reader.kill(block=False)
        self.sock.close()
        self.waiters.fail_all("closed")


class UdpPool:
    """A bounded set of long-lived UDP sockets to one server, used round robin and renewed over time."""

    def __init__(
        self,
        sockaddr: tuple[str, int],
        family: int,
        dropped: DroppedReply,
        size: int = UDP_POOL_SIZE,
        max_queries: int = UDP_MAX_QUERIES,
        max_age: float = UDP_MAX_AGE,
    ) -> None:
        self.sockaddr = sockaddr
        self.family = family
        self.dropped = dropped
        self.size = size
        self.max_queries = max_queries
        self.max_age = max_age
        self.sockets: list[_UdpSocket | None] = [None] * size
        self.next = 0
        self.opened = 0  # sockets opened so far, retired ones included

    def exchange(self, query: bytes, question: bytes, timeout: float) -> bytes:
        """Send `query` under a fresh random ID and return the matching reply; UpstreamError otherwise."""
        slot = self.next
        self.next = (slot + 1) % self.size
        sock = self.sockets[slot]
        if sock is None or sock.queries >= self.max_queries or time.monotonic() - sock.born >= self.max_age:
            if sock is not None:
                gevent.spawn_later(RETIRED_GRACE, sock.close)  # answers on their way still arrive
            try:
                sock = self.sockets[slot] = _UdpSocket(self.sockaddr, self.family, self.dropped)
            except OSError as exc:
                self.sockets[slot] = None
                raise UpstreamError(os_reason(exc)) from None
            self.opened += 1
        return sock.exchange(query, question, timeout)

    def close(self) -> None:
        for index, sock in enumerate(self.sockets):
            if sock is not None:
                sock.close()
                self.sockets[index] = None


class _TcpConnection:
    """One TCP connection to the server: queries pipelined, answers matched by ID in any order."""

    def __init__(self, sock: socket.socket, dropped: DroppedReply, on_close: Callable[[_TcpConnection], None]) -> None:
        self.sock = sock
        self.waiters = _Waiters()
        self.dropped = dropped
        self.on_close = on_close
        self.write_lock = gevent.lock.Semaphore()
        self.closed = False
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        reason = "closed"
        try:
            while True:
                try:
                    length = _U16.unpack(self._recv_exact(2))[0]
                except TimeoutError:
                    if not self.waiters.by_id:
                        return  # idle: close (RFC 7766 §6.2.3)
                    continue
                self.waiters.deliver(self._recv_exact(length), self.dropped)
        except (EOFError, TimeoutError):
            pass  # the server closed, or stopped mid-message
        except OSError as exc:
            reason = os_reason(exc)
        finally:
            self._close(reason)

    def _recv_exact(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = self.sock.recv(size)
            if not chunk:
                raise EOFError("closed")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def exchange(self, query: bytes, question: bytes, timeout: float) -> bytes:
        if self.closed:
            raise UpstreamError("closed")
        qid, waiter = self.waiters.add(question)
        try:
            with self.write_lock:
                self.sock.sendall(_U16.pack(len(query)) + _U16.pack(qid) + query[2:])
        except OSError as exc:
            self.waiters.by_id.pop(qid, None)
            self._close(os_reason(exc))
            raise UpstreamError("closed") from None
        return _wait(self.waiters, qid, waiter, timeout)

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        self.waiters.fail_all("closed" if reason == "closed" else reason)
        self.on_close(self)

    def close(self) -> None:
        self.reader.kill(block=False)
        self._close("closed")


class TcpPool:
    """Up to TCP_MAX_CONNECTIONS open connections to one server, reused until idle or closed by it."""

    def __init__(
        self,
        sockaddr: tuple[str, int],
        family: int,
        dropped: DroppedReply,
        max_connections: int = TCP_MAX_CONNECTIONS,
        idle_close: float = TCP_IDLE_CLOSE,
    ) -> None:
        self.sockaddr = sockaddr
        self.family = family
        self.dropped = dropped
        self.max_connections = max_connections
        self.idle_close = idle_close
        self.connections: list[_TcpConnection] = []
        self.opening = gevent.lock.Semaphore()
        self.opened = 0  # connections opened so far

    def exchange(self, query: bytes, question: bytes, timeout: float) -> bytes:
        """The reply over TCP; a connection the server closed before answering is replaced once."""
        end = time.monotonic() + timeout
        for attempt in range(2):
            connection = self._pick(end)
            try:
                return connection.exchange(query, question, max(0.0, end - time.monotonic()))
            except UpstreamError as exc:
                # A reused connection the server had closed (idle timeout, restart): open a new
                # one and send again, once. A fresh connection that fails is the server's answer.
                if exc.reason != "closed" or attempt or time.monotonic() >= end:
                    raise
        raise UpstreamError("closed")  # not reached: the loop returns or raises

    def _pick(self, end: float) -> _TcpConnection:
        # One connect at a time: queries arriving meanwhile wait and then share the new connection.
        with self.opening:
            best = min(self.connections, key=lambda c: len(c.waiters.by_id), default=None)
            if best is not None and (
                len(best.waiters.by_id) < TCP_PIPELINE or len(self.connections) >= self.max_connections
            ):
                return best
            return self._open(end)

    def _open(self, end: float) -> _TcpConnection:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, end - time.monotonic()))
            sock.connect(self.sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.idle_close)
        except TimeoutError:
            sock.close()
            raise UpstreamError("timeout") from None
        except OSError as exc:
            sock.close()
            raise UpstreamError(os_reason(exc)) from None
        connection = _TcpConnection(sock, self.dropped, self._forget)
        self.connections.append(connection)
        self.opened += 1
        return connection

    def _forget(self, connection: _TcpConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()


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
