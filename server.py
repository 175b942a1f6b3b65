"""The DNS servers: UDP and TCP on each listen address, who may ask (--allow), and the error ladder.

A server parses a query, answers a fresh hit inline through the resolver's one fresh-hit function,
and hands everything else to a bounded set of greenlets; nothing here decides what to answer.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from typing import Any

import gevent
import gevent.lock
import gevent.pool
from gevent import socket
from gevent.server import DatagramServer, StreamServer

import wire
from config import Endpoint
from logs import RateLimitedLog
from metrics import HIT_SAMPLE_MASK, Stats
from resolver import Resolver, TaskLimit
from transport import recv_exact

_U16 = struct.Struct("!H")
TCP_MAX = 65535
TCP_PIPELINE = 16  # queries of one TCP connection handled at once (RFC 7766 §6.2.1.1 pipelining)
FIRST_QUERY_WAIT = 0.5  # at shutdown, how long a new TCP connection still gets to send its first query
MAX_ACCESS_DECISIONS = 65536  # client addresses whose --allow decision is remembered
IP_FREEBIND = 15  # linux/in.h: bind an address the node does not have yet
IPV6_FREEBIND = 78  # linux/in6.h (Linux 4.15+): the same for an IPv6 socket


class AccessList:
    """Which client addresses may query (--allow); decisions are kept per address, bounded."""

    def __init__(self, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> None:
        self.networks = networks
        self.decisions: dict[str, bool] = {}

    def decide(self, host: str) -> bool:
        """The slow path of the check: match the address against the networks and remember it."""
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        allowed = any(address in network for network in self.networks if network.version == address.version)
        if len(self.decisions) >= MAX_ACCESS_DECISIONS:
            self.decisions.clear()
        self.decisions[host] = allowed
        return allowed


class QueryHandler:
    """What both servers share: parse, answer a fresh hit inline, hand the rest to a bounded pool."""

    def __init__(
        self,
        resolver: Resolver,
        pool: TaskLimit,
        log: Any,
        log_queries: bool,
        access: AccessList,
    ) -> None:
        self.resolver = resolver
        self.access = access
        self.stats: Stats = resolver.stats
        self.sample_latency = resolver.hit_metrics
        self.pool = pool
        self.errors: RateLimitedLog = resolver.errors
        self.log = log
        self.log_queries = log_queries

    def parse(self, data: bytes) -> tuple[wire.Query | None, bytes | None]:
        """(query, None) to resolve, (None, answer) for an error answer, or (None, None) to drop."""
        stats = self.stats
        stats.queries += 1
        try:
            return wire.parse_query(data), None
        except wire.DropQuery as exc:
            if len(data) >= 3 and data[2] & 0x80:
                stats.dropped_qr += 1
            else:
                stats.dropped_malformed += 1
            if self.log_queries:
                self.log.debug("query_dropped", reason=str(exc))
            return None, None
        except wire.BadQuery as exc:
            stats.responses[exc.rcode] += 1
            if exc.rcode == wire.NOTIMP:
                stats.notimp += 1
            else:
                stats.formerr += 1
            if self.log_queries:
                self.log.debug("query_refused", reason=exc.reason, rcode=exc.rcode)
            return None, wire.error_response(data, exc.rcode, exc.query)

    def refuse(self, data: bytes) -> bytes | None:
        """REFUSED for a client outside --allow (nothing for packets that get no answer at all)."""
        self.stats.refused += 1
        query, answer = self.parse(data)
        if query is not None:
            self.stats.responses[wire.REFUSED] += 1
            return wire.error_response(data, wire.REFUSED, query)
        return answer

    def resolve(self, query: wire.Query, max_size: int, proto: str, started: float) -> bytes:
        """Full path with the error ladder: a failure becomes SERVFAIL and one (rate-limited) log line."""
        stats = self.stats
        stats.queries_by_type[(proto, query.qtype)] += 1
        try:
            answer, outcome = self.resolver.resolve(query, max_size)
        except Exception as exc:
            stats.handler_errors += 1
            self.errors.error("handler_failed", error=repr(exc), qtype=query.qtype)
            answer, outcome = wire.error_response(query.wire, wire.SERVFAIL, query), "error"
        stats.responses[answer[3] & 0xF] += 1
        stats.answer_latency[outcome].observe(time.perf_counter() - started)
        if self.log_queries:
            self.log.debug("query", qname=query.qname, qtype=query.qtype, rcode=answer[3] & 0xF, size=len(answer))
        return answer


class DnsUdpServer(DatagramServer):
    """UDP on one address: fresh hits answered inline in the read loop, the rest in pool greenlets."""

    max_accept = 200  # datagrams read per readiness event before other greenlets get a turn

    def __init__(self, listener: socket.socket, handler: QueryHandler) -> None:
        super().__init__(listener, handle=self.handle_datagram)
        self.handler = handler

    def _do_read(self) -> None:
        # Replaces BaseServer's loop: no spawn, no close callback per datagram. A cache hit costs
        # one recvfrom, the walk of the query, one dict probe, one copy and one sendto .
        recvfrom = self._socket.recvfrom
        handle = self.handle_datagram
        for _ in range(self.max_accept):
            try:
                data, address = recvfrom(8192)
            except BlockingIOError:
                return
            except OSError as exc:
                self.handler.errors.error("udp_receive_failed", error=repr(exc))
                return
            handle(data, address)

    def handle_datagram(self, data: bytes, address: tuple[Any, ...]) -> None:
        handler = self.handler
        try:
            allowed = handler.access.decisions.get(address[0])
            if allowed is None:
                allowed = handler.access.decide(address[0])
            if not allowed:
                answer = handler.refuse(data)
                if answer is not None:
                    self._send(answer, address)
                return
            stats = handler.stats
            sampled = handler.sample_latency and not stats.queries & HIT_SAMPLE_MASK
            started = time.perf_counter() if sampled else 0.0
            answer = handler.resolver.answer_fresh_udp(data)
            if answer is not None:
                stats.queries += 1
                if handler.log_queries:
                    handler.log.debug("query", size=len(data), cache="hit")
                self._send(answer, address)
                if sampled:
                    stats.answer_latency["hit"].observe(time.perf_counter() - started)
                return
            query, answer = handler.parse(data)
            if query is not None:
                handler.resolver.remember(data, query)
                answer = handler.resolver.answer_fresh(query, query.max_udp, "udp", data)
                if answer is None:
                    if handler.pool.full():
                        stats.dropped_overload += 1
                        return
                    handler.pool.spawn(self._resolve_and_send, query, address, time.perf_counter())
                    return
                if handler.log_queries:
                    handler.log.debug("query", qname=query.qname, qtype=query.qtype, cache="hit")
            if answer is not None:
                self._send(answer, address)
        except Exception as exc:
            handler.stats.handler_errors += 1
            handler.errors.error("udp_handler_failed", error=repr(exc))

    def _resolve_and_send(self, query: wire.Query, address: tuple[Any, ...], started: float) -> None:
        try:
            self._send(self.handler.resolve(query, query.max_udp, "udp", started), address)
        except Exception as exc:
            self.handler.errors.error("udp_handler_failed", error=repr(exc))

    def _send(self, answer: bytes, address: tuple[Any, ...]) -> None:
        try:
            self._socket.sendto(answer, address)
        except BlockingIOError:
            pass  # send buffer full: UDP may drop, the client retries
        except OSError as exc:
            self.handler.errors.error("udp_send_failed", error=repr(exc))


class DnsTcpServer(StreamServer):
    """TCP on one address (RFC 7766): length-framed, pipelined, answered as each completes."""

    def __init__(
        self, listener: socket.socket, handler: QueryHandler, max_connections: int, idle_timeout: float
    ) -> None:
        super().__init__(listener, handle=self.handle_connection, spawn=gevent.pool.Pool(max_connections))
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.idle_connections: dict[Any, bool] = {}  # greenlet -> whether it answered a query already

    def handle_connection(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        try:
            host = address[0]
            allowed = self.handler.access.decisions.get(host)
            self._serve(sock, allowed if allowed is not None else self.handler.access.decide(host))
        except Exception as exc:
            self.handler.errors.error("tcp_handler_failed", error=repr(exc))
        finally:
            sock.close()

    def _serve(self, sock: socket.socket, allowed: bool) -> None:
        handler = self.handler
        sock.settimeout(self.idle_timeout)
        write_lock = gevent.lock.Semaphore()
        pipeline = gevent.pool.Pool(TCP_PIPELINE)
        me = gevent.getcurrent()
        served = False
        try:
            while True:
                if not len(pipeline):
                    self.idle_connections[me] = served
                try:
                    header = sock.recv(2)
                except TimeoutError:
                    if len(pipeline):
                        pipeline.join()
                        continue
                    return  # idle: close (RFC 7766 §6.2.3)
                finally:
                    self.idle_connections.pop(me, None)
                if not header:
                    break  # client closed its side; answers in flight still go out
                # Once a message has begun, all of it must arrive within the idle timeout: a client
                # dripping bytes cannot hold a connection slot for ever (RFC 7766 §10).
                deadline = time.monotonic() + self.idle_timeout
                if len(header) == 1:
                    header += recv_exact(sock, 1, deadline)
                length = _U16.unpack(header)[0]
                if not length:
                    break
                data = recv_exact(sock, length, deadline)
                served = True
                sock.settimeout(self.idle_timeout)
                if not allowed:
                    answer = handler.refuse(data)
                    if answer is not None:
                        _send_framed(sock, write_lock, answer)
                    continue
                query, answer = handler.parse(data)
                if query is not None:
                    answer = handler.resolver.answer_fresh(query, TCP_MAX, "tcp")
                    if answer is None:
                        pipeline.spawn(self._resolve_and_send, sock, write_lock, query, time.perf_counter())
                        continue
                if answer is not None:
                    _send_framed(sock, write_lock, answer)
        except (OSError, TimeoutError, EOFError):
            pass  # reset, stalled or vanished client: drop the connection
        pipeline.join(timeout=handler.resolver.config.deadline + 1)

    def _resolve_and_send(
        self, sock: socket.socket, write_lock: gevent.lock.Semaphore, query: wire.Query, started: float
    ) -> None:
        try:
            _send_framed(sock, write_lock, self.handler.resolve(query, TCP_MAX, "tcp", started))
        except (OSError, TimeoutError):
            pass
        except Exception as exc:
            self.handler.errors.error("tcp_handler_failed", error=repr(exc))

    def close_idle(self) -> None:
        """At shutdown: close connections that wait for a next query; busy ones finish.

        A connection that has not sent its first query yet gets FIRST_QUERY_WAIT more: its client
        connected to ask one, which may be on its way (during a takeover).
        """
        for greenlet, served in list(self.idle_connections.items()):
            if served:
                greenlet.kill(block=False)
            else:
                gevent.spawn_later(FIRST_QUERY_WAIT, self._close_if_idle, greenlet)

    def _close_if_idle(self, greenlet: Any) -> None:
        if greenlet in self.idle_connections:
            greenlet.kill(block=False)

    def hand_over(self) -> None:
        """At shutdown: accept every connection the kernel already queued for us, then close the listener.

        Closing a listener resets the connections in its accept queue, and the kernel keeps putting
        new ones there while the socket is in the SO_REUSEPORT group. Nothing yields between the
        last accept and the close, so only a handshake completing in those microseconds is lost
        (none with net.ipv4.tcp_migrate_req=1, which moves them to the other listeners).
        """
        self.stop_accepting()
        accepted: list[tuple[socket.socket, tuple[Any, ...]]] = []
        while True:
            try:
                client = self.do_read()
            except OSError:
                break
            if not client:
                break
            accepted.append(client)
        self.close()
        for sock, address in accepted:
            self.pool.spawn(self.handle_connection, sock, address)


def _send_framed(sock: socket.socket, write_lock: gevent.lock.Semaphore, answer: bytes) -> None:
    with write_lock:
        sock.sendall(_U16.pack(len(answer)) + answer)


def bind_sockets(endpoint: Endpoint, freebind: bool = False) -> tuple[socket.socket, socket.socket]:
    """The UDP socket and the listening TCP socket of one listen address.

    freebind: bind before the address exists on the node (interception adds it after binding).
    """
    family = socket.AF_INET6 if endpoint.family_is_v6 else socket.AF_INET
    address = (endpoint.host, endpoint.port)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # SO_REUSEPORT on both, on purpose: during a takeover the new proxy binds while the
        # old one still serves, and the kernel spreads new datagrams and connections over the
        # group. So an exiting proxy must not just close (its queued datagrams would be lost): it
        # leaves the group first and reads what it holds (handover.detach_udp, DnsTcpServer.hand_over).
        # Only sockets of the same effective UID join a group (socket(7)): a process of another
        # user still fails with EADDRINUSE, as does any socket bound without SO_REUSEPORT. A second
        # proxy of the same user started by mistake shares the queries; it logs listen_address_shared.
        # No SO_REUSEADDR on UDP (it would let a non-reuseport socket share the port); TCP gets it so
        # a restart can rebind past TIME_WAIT.
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if freebind:
            for sock in (udp, tcp):
                _set_freebind(sock, family)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        udp.bind(address)
        tcp.bind((endpoint.host, udp.getsockname()[1]))
        tcp.listen(1024)
    except OSError:
        udp.close()
        tcp.close()
        raise
    return udp, tcp


def _set_freebind(sock: socket.socket, family: int) -> None:
    if family == socket.AF_INET6:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            return
        except OSError:
            pass  # before Linux 4.15: IP_FREEBIND also applies to an IPv6 socket
    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)


def bind_loopback_udp() -> socket.socket:
    """A UDP socket on 127.0.0.1 with a port of the kernel's choosing, for the liveness check alone.

    No SO_REUSEPORT: it is this process's own, so /health never asks another instance's loop.
    """
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.bind(("127.0.0.1", 0))
    except OSError:
        udp.close()
        raise
    return udp
