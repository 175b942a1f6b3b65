"""Entry point: the UDP and TCP servers and the per-query flow (cache hit, stale, miss, coalescing)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import struct
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.subprocess
import structlog
from gevent import socket
from gevent.server import DatagramServer, StreamServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import config as config_module
import policy
import wire
from cache import AnswerCache, Entry, TtlPolicy, answer_ttl, entry_from_reply
from config import Config, Endpoint
from configfile import ConfigReloader
from control import CacheControl, loopback_only
from control import cli as control_cli
from handover import SERVING, STARTING, STOPPING, InstanceRegistry, detach_udp, other_sockets, wait_until_read
from httpapi import HttpApi
from metrics import HIT_SAMPLE_MASK, Metrics, make_registry
from netsetup import InterceptError, Interceptor, InterceptSpec
from persist import CachePersister
from upstream import UpstreamError, Upstreams, recv_exact

_U16 = struct.Struct("!H")
TCP_MAX = 65535
TCP_PIPELINE = 16  # queries of one TCP connection handled at once (RFC 7766 §6.2.1.1 pipelining)
FIRST_QUERY_WAIT = 0.5  # at shutdown, how long a new TCP connection still gets to send its first query
LOG_BURST = 10  # error lines per event and window before they are only counted
MAX_TEMPLATES = 20_000  # parsed queries kept for the hot path (about 6 MB at most)
RENDERED_PER_ENTRY = 8  # rendered answers kept per cache entry
MAX_ACCESS_DECISIONS = 65536  # client addresses whose --allow decision is remembered
DOWN_TRIES_PER_SECOND = 5  # misses forwarded anyway while every upstream is marked down
INVALID_TLD = b"\x07invalid\x00"
IP_FREEBIND = 15  # linux/in.h: bind an address the node does not have yet


def configure_logging(level: str, stream=None, cache_logger: bool = True) -> structlog.typing.FilteringBoundLogger:
    """JSON logs, one object per line on stdout, ISO UTC timestamps; filtered levels cost nothing."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=cache_logger,
    )
    return structlog.get_logger()


class Counters:
    """Plain integer counters of what the proxy did; read by the periodic summary and the tests' logs."""

    __slots__ = (
        "queries",
        "hits",
        "stale_served",
        "misses",
        "coalesced",
        "servfail",
        "dropped_malformed",
        "dropped_qr",
        "dropped_overload",
        "formerr",
        "notimp",
        "handler_errors",
        "refused",
        "prefetches",
        "negative_held",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class RateLimitedLog:
    """Error lines limited to LOG_BURST per event and window; the rest are counted and reported once."""

    def __init__(self, log, window: float = 10.0) -> None:
        self.log = log
        self.window = window
        self.windows: dict[str, tuple[float, int]] = {}

    def error(self, event: str, **fields) -> None:
        now = time.monotonic()
        start, count = self.windows.get(event, (now, 0))
        if now - start > self.window:
            if count > LOG_BURST:
                self.log.warning("log_lines_suppressed", suppressed_event=event, count=count - LOG_BURST)
            start, count = now, 0
        count += 1
        self.windows[event] = (start, count)
        if count <= LOG_BURST:
            self.log.error(event, **fields)


class TaskLimit:
    """Greenlets for queries beyond cache hits, at most `limit` at once: a full limit refuses.

    gevent.spawn_raw without a Pool's Greenlet objects, links and semaphore: a miss costs one
    light spawn (measured: Pool.spawn was a sixth of the miss path's time).
    """

    def __init__(self, limit: int, errors: RateLimitedLog) -> None:
        self.limit = limit
        self.errors = errors
        self.active: set = set()
        self.idle = gevent.event.Event()
        self.idle.set()

    def __len__(self) -> int:
        return len(self.active)

    def full(self) -> bool:
        return len(self.active) >= self.limit

    def spawn(self, function: Callable, *args) -> None:
        self.idle.clear()
        self.active.add(gevent.spawn_raw(self._run, function, args))

    def _run(self, function: Callable, args: tuple) -> None:
        try:
            function(*args)
        except Exception as exc:  # the boundary of a greenlet: nothing escapes to the hub
            self.errors.error("task_failed", error=repr(exc))
        finally:
            self.active.discard(gevent.getcurrent())
            if not self.active:
                self.idle.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no task runs; False if some still do after timeout seconds."""
        return self.idle.wait(timeout)

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        for greenlet in list(self.active):
            gevent.kill(greenlet)
        if block:
            self.idle.wait(timeout)


class Resolver:
    """The per-query flow beyond a fresh hit: stale answers, misses, coalescing, background refresh."""

    def __init__(
        self,
        config: Config,
        cache: AnswerCache,
        upstreams: Upstreams,
        log,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.cache = cache
        self.log = log
        self.errors = RateLimitedLog(log)
        self.timer = timer
        # Per-zone upstreams and TTL bounds (--forward), chosen on the miss path; swapped on reload.
        self.router = policy.build_router(config, log, default=upstreams)
        self.prefetch_window = policy.prefetch_window(config)  # 0.0: prefetch off
        self.counters = Counters()
        self.inflight: dict[bytes, gevent.event.AsyncResult] = {}
        self.templates: dict[bytes, wire.Query] = {}
        # Cache hits by protocol, qtype and rcode, kept here because hits never reach QueryHandler.
        self.hit_qtypes: dict[str, dict[int, int]] = {"udp": defaultdict(int), "tcp": defaultdict(int)}
        self.hit_rcodes: dict[int, int] = defaultdict(int)
        self.stale_max_age = 0.0
        self.hit_metrics = not config.no_metrics
        self.down_window_start = 0.0
        self.down_window_tries = 0
        self.fetch_pool = TaskLimit(config.max_concurrent, self.errors)
        self.stale_since: float | None = None
        self.stale_in_episode = 0
        self.last_stale_at = 0.0

    # The hot path, used inline by the servers: no greenlet, no logging, and for a query seen
    # before no parse and no render either (STYLE.md habit 5, issue 3).
    def answer_fresh_udp(self, data: bytes) -> bytes | None:
        """The UDP answer from a fresh cache entry, or None when the full path is needed."""
        body = data[2:]
        query = self.templates.get(body)
        if query is None:
            return None
        entry = self.cache.lookup(query.key)
        if entry is None:
            return None
        remaining = entry.expires_at - self.timer()
        if remaining <= 0:
            return None
        # Whole seconds counted down from the stored TTL, as resolvers show them: ceil(remaining).
        ttl = int(remaining)
        if remaining > ttl:
            ttl += 1
        entry.hits += 1
        self.counters.hits += 1
        if self.hit_metrics:
            self.hit_qtypes["udp"][query.qtype] += 1
            self.hit_rcodes[entry.rcode] += 1
        if self.prefetch_window and remaining <= entry.ttl * self.prefetch_window:
            self._prefetch(query, entry)
        memo = entry.rendered
        if memo is None:
            memo = entry.rendered = {}
        else:
            rendered = memo.get(body)
            if rendered is not None and rendered[0] == ttl:
                return data[:2] + rendered[1][2:]
        answer = entry.render(query, ttl, query.max_udp, qid=data[:2])
        if len(memo) >= RENDERED_PER_ENTRY:
            memo.clear()  # many spellings of one question (0x20 case): keep it bounded
        memo[body] = (ttl, answer)
        return answer

    def remember(self, data: bytes, query: wire.Query) -> None:
        """Keep a parsed query by its bytes less the ID, so the next identical one skips the parse."""
        templates = self.templates
        if len(templates) >= MAX_TEMPLATES:
            templates.clear()  # bounded; refills with what clients ask now
        templates[data[2:]] = query

    def answer_fresh(self, query: wire.Query, max_size: int, proto: str = "udp") -> bytes | None:
        """The answer from a fresh cache entry for a parsed query, or None when the full path is needed."""
        entry = self.cache.lookup(query.key)
        if entry is None:
            return None
        now = self.timer()
        if entry.expires_at <= now:
            return None
        entry.hits += 1
        self.counters.hits += 1
        self.hit_qtypes[proto][query.qtype] += 1
        self.hit_rcodes[entry.rcode] += 1
        if self.prefetch_window and entry.expires_at - now <= entry.ttl * self.prefetch_window:
            self._prefetch(query, entry)
        return entry.render(query, answer_ttl(entry, now), max_size)

    def resolve(self, query: wire.Query, max_size: int) -> bytes:
        """The answer for a query that may need the upstream; never raises for upstream trouble."""
        return self.resolve_outcome(query, max_size)[0]

    def resolve_outcome(self, query: wire.Query, max_size: int) -> tuple[bytes, str]:
        """The answer and how it was found: hit, stale (the entry was stale on arrival), miss or local."""
        if query.key[:-5].endswith(INVALID_TLD):
            # RFC 6761 §6.4: never sent upstream. Also what the health checks ask, so they do not
            # depend on kube-dns.
            return wire.error_response(query.wire, wire.NXDOMAIN, query), "local"
        now = self.timer()
        entry = self.cache.lookup(query.key)
        if entry is not None:
            if entry.expires_at > now:
                entry.hits += 1
                self.counters.hits += 1
                if self.prefetch_window and entry.expires_at - now <= entry.ttl * self.prefetch_window:
                    self._prefetch(query, entry)
                return entry.render(query, answer_ttl(entry, now), max_size), "hit"
            if self.config.serve_stale and entry.stale_for(now) <= self.config.max_stale:
                return self._stale_path(query, entry, now, max_size), "stale"
        self.counters.misses += 1
        return self._miss_path(query, max_size), "miss"

    def _miss_path(self, query: wire.Query, max_size: int) -> bytes:
        upstreams = self.router.route_for(query.key).upstreams
        if upstreams.all_down():
            # Known down: SERVFAIL at once. A few misses a second still go upstream in the
            # background, so the first answer ends the outage without a flood of doomed tries.
            if query.key in self.inflight or self._may_try_while_down():
                self._fetch(query)
            return self._servfail(query)
        # The first asker fetches in its own greenlet (one spawn less per miss); identical
        # queries arriving meanwhile wait on its result.
        pending = self._fetch(query, inline=True)
        if pending is None:
            return self._servfail(query)
        pending.wait(self.config.deadline)
        if pending.successful():
            fresh = pending.value
            if fresh.rcode in (wire.NOERROR, wire.NXDOMAIN):
                return fresh.render(query, answer_ttl(fresh, self.timer()), max_size)
        return self._servfail(query)

    def _may_try_while_down(self) -> bool:
        """At most DOWN_TRIES_PER_SECOND background tries a second while every upstream is down."""
        now = self.timer()
        if now - self.down_window_start >= 1.0:
            self.down_window_start, self.down_window_tries = now, 0
        self.down_window_tries += 1
        return self.down_window_tries <= DOWN_TRIES_PER_SECOND

    def _stale_path(self, query: wire.Query, entry: Entry, now: float, max_size: int) -> bytes:
        if entry.retry_after > now or self.router.route_for(query.key).upstreams.all_down():
            # RFC 8767 §5: after a failure, answer stale at once and recheck at most every
            # failure_recheck seconds, in the background.
            if entry.retry_after <= now:
                entry.retry_after = now + self.config.failure_recheck
                self._fetch(query)
            return self._stale(query, entry, max_size)
        pending = self._fetch(query)
        if pending is not None:
            # RFC 8767 client response timer: wait a little for fresh data, then answer stale;
            # the refresh goes on in the background.
            pending.wait(self.config.stale_answer_timeout)
            if pending.successful():
                fresh = pending.value
                if fresh.rcode in (wire.NOERROR, wire.NXDOMAIN):
                    return fresh.render(query, answer_ttl(fresh, self.timer()), max_size)
        entry.retry_after = self.timer() + self.config.failure_recheck
        return self._stale(query, entry, max_size)

    def _stale(self, query: wire.Query, entry: Entry, max_size: int) -> bytes:
        counters = self.counters
        counters.stale_served += 1
        now = self.timer()
        self.last_stale_at = now
        self.stale_in_episode += 1
        self.stale_max_age = max(self.stale_max_age, entry.stale_for(now))
        if self.stale_since is None:
            self.stale_since = now
            self.log.warning(
                "stale_serving_started",
                qname=query.qname,
                stale_seconds=round(entry.stale_for(now), 1),
                upstreams_down=[str(s.endpoint) for s in self.router.route_for(query.key).upstreams.servers if s.down],
            )
        return entry.render(query, self.config.stale_ttl, max_size, stale=True)

    def _servfail(self, query: wire.Query) -> bytes:
        self.counters.servfail += 1
        ede = wire.EDE_NO_REACHABLE_AUTHORITY if query.edns else None
        return wire.error_response(query.wire, wire.SERVFAIL, query, ede)

    @property
    def upstreams(self) -> Upstreams:
        """The default route's upstreams (--upstream)."""
        return self.router.default.upstreams

    @property
    def policy(self) -> TtlPolicy:
        """The default route's TTL bounds."""
        return self.router.default.policy

    def _prefetch(self, query: wire.Query, entry: Entry) -> None:
        """Refresh a popular entry in its last --prefetch-percent of TTL (CoreDNS cache prefetch).

        One try per --failure-recheck: retry_after marks the try, so the hits that follow a failed
        prefetch do not each send one; a successful one replaces the entry (hits start again at 0).
        """
        now = self.timer()
        if entry.hits < self.config.prefetch or entry.retry_after > now:
            return
        entry.retry_after = now + self.config.failure_recheck
        if self._fetch(query) is not None:
            self.counters.prefetches += 1

    def _fetch(self, query: wire.Query, inline: bool = False) -> gevent.event.AsyncResult | None:
        """The pending upstream answer for this key: joined if one is in flight, else started.

        inline: run the fetch in the calling greenlet and return it done; otherwise in the background.
        """
        key = query.key
        pending = self.inflight.get(key)
        if pending is not None:
            self.counters.coalesced += 1
            return pending
        if not inline and self.fetch_pool.full():
            return None
        pending = gevent.event.AsyncResult()
        self.inflight[key] = pending
        if inline:
            self._run_fetch(key, query.question, query.do, query.cd, pending)
        else:
            self.fetch_pool.spawn(self._run_fetch, key, query.question, query.do, query.cd, pending)
        return pending

    def _run_fetch(self, key: bytes, question: bytes, do: bool, cd: bool, pending) -> None:
        try:
            route = self.router.route_for(key)
            reply = route.upstreams.query(question, do, cd)
            now = self.timer()
            fresh, cacheable = entry_from_reply(reply, route.policy, now)
            if self.config.prefer_positive and policy.keeps_positive(
                self.config, route, self.cache.lookup(key), fresh, now
            ):
                # The upstream is in trouble and denies a name we know: keep ours (--prefer-positive).
                self.counters.negative_held += 1
                pending.set_exception(UpstreamError("negative_held"))
                return
            if cacheable:
                # A fresh NOERROR or NXDOMAIN replaces a stale entry (RFC 8767 §4).
                self.cache.store(key, fresh)
            pending.set(fresh)
        except UpstreamError as exc:
            pending.set_exception(exc)
        except wire.WireError as exc:
            self.errors.error("upstream_reply_malformed", reason=str(exc))
            pending.set_exception(UpstreamError("malformed"))
        except Exception as exc:  # the boundary of a greenlet: nothing escapes to the hub
            self.errors.error("fetch_failed", error=repr(exc))
            pending.set_exception(UpstreamError("error"))
        finally:
            self.inflight.pop(key, None)

    def report_stale_episode(self) -> None:
        """Close a stale-serving episode once no stale answer was needed for a while (one line, not one per answer)."""
        if self.stale_since is None:
            return
        now = self.timer()
        if now - self.last_stale_at >= 5.0:
            self.log.info(
                "stale_serving_ended",
                stale_answers=self.stale_in_episode,
                duration_seconds=round(self.last_stale_at - self.stale_since, 1),
            )
            self.stale_since = None
            self.stale_in_episode = 0
            self.stale_max_age = 0.0


class AccessList:
    """Which client addresses may query (--allow); decisions are kept per address, bounded."""

    def __init__(self, networks: tuple) -> None:
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
        pool: gevent.pool.Pool,
        log,
        log_queries: bool,
        access: AccessList,
        metrics: Metrics,
    ) -> None:
        self.resolver = resolver
        self.access = access
        self.metrics = metrics
        self.sample_latency = resolver.hit_metrics
        self.pool = pool
        self.counters = resolver.counters
        self.errors = resolver.errors
        self.log = log
        self.log_queries = log_queries

    def parse(self, data: bytes) -> tuple[wire.Query | None, bytes | None]:
        """(query, None) to resolve, (None, answer) for an error answer, or (None, None) to drop."""
        counters = self.counters
        counters.queries += 1
        try:
            return wire.parse_query(data), None
        except wire.DropQuery as exc:
            if len(data) >= 3 and data[2] & 0x80:
                counters.dropped_qr += 1
            else:
                counters.dropped_malformed += 1
            if self.log_queries:
                self.log.debug("query_dropped", reason=str(exc))
            return None, None
        except wire.BadQuery as exc:
            self.metrics.responses[exc.rcode] += 1
            if exc.rcode == wire.NOTIMP:
                counters.notimp += 1
            else:
                counters.formerr += 1
            if self.log_queries:
                self.log.debug("query_refused", reason=exc.reason, rcode=exc.rcode)
            return None, wire.error_response(data, exc.rcode, exc.query)

    def refuse(self, data: bytes) -> bytes | None:
        """REFUSED for a client outside --allow (nothing for packets that get no answer at all)."""
        self.counters.refused += 1
        query, answer = self.parse(data)
        if query is not None:
            self.metrics.responses[wire.REFUSED] += 1
            return wire.error_response(data, wire.REFUSED, query)
        return answer

    def resolve(self, query: wire.Query, max_size: int, proto: str, started: float) -> bytes:
        """Full path with the error ladder: a failure becomes SERVFAIL and one (rate-limited) log line."""
        metrics = self.metrics
        metrics.queries[(proto, query.qtype)] += 1
        try:
            answer, outcome = self.resolver.resolve_outcome(query, max_size)
        except Exception as exc:
            self.counters.handler_errors += 1
            self.errors.error("handler_failed", error=repr(exc), qtype=query.qtype)
            answer, outcome = wire.error_response(query.wire, wire.SERVFAIL, query), "error"
        metrics.responses[answer[3] & 0xF] += 1
        metrics.answer_latency[outcome].observe(time.perf_counter() - started)
        if self.log_queries:
            self.log.debug("query", qname=query.qname, qtype=query.qtype, rcode=answer[3] & 0xF, size=len(answer))
        return answer


class DnsUdpServer(DatagramServer):
    """UDP on one address: fresh hits answered inline in the read loop, the rest in pool greenlets."""

    max_accept = 200  # datagrams read per readiness event before other greenlets get a turn

    def __init__(self, listener, handler: QueryHandler) -> None:
        super().__init__(listener, handle=self.handle_datagram)
        self.handler = handler

    def _do_read(self) -> None:
        # Replaces BaseServer's loop: no spawn, no close callback per datagram. A cache hit costs
        # one recvfrom, the walk of the query, one dict probe, one copy and one sendto (issue 3).
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

    def handle_datagram(self, data: bytes, address) -> None:
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
            counters = handler.counters
            sampled = handler.sample_latency and not counters.queries & HIT_SAMPLE_MASK
            if sampled:
                started = time.perf_counter()
            answer = handler.resolver.answer_fresh_udp(data)
            if answer is not None:
                counters.queries += 1
                if handler.log_queries:
                    handler.log.debug("query", size=len(data), cache="hit")
                self._send(answer, address)
                if sampled:
                    handler.metrics.answer_latency["hit"].observe(time.perf_counter() - started)
                return
            query, answer = handler.parse(data)
            if query is not None:
                handler.resolver.remember(data, query)
                answer = handler.resolver.answer_fresh(query, query.max_udp)
                if answer is None:
                    if handler.pool.full():
                        handler.counters.dropped_overload += 1
                        return
                    handler.pool.spawn(self._resolve_and_send, query, address, time.perf_counter())
                    return
                if handler.log_queries:
                    handler.log.debug("query", qname=query.qname, qtype=query.qtype, cache="hit")
            if answer is not None:
                self._send(answer, address)
        except Exception as exc:
            handler.counters.handler_errors += 1
            handler.errors.error("udp_handler_failed", error=repr(exc))

    def _resolve_and_send(self, query: wire.Query, address, started: float) -> None:
        try:
            self._send(self.handler.resolve(query, query.max_udp, "udp", started), address)
        except Exception as exc:
            self.handler.errors.error("udp_handler_failed", error=repr(exc))

    def _send(self, answer: bytes, address) -> None:
        try:
            self._socket.sendto(answer, address)
        except BlockingIOError:
            pass  # send buffer full: UDP may drop, the client retries
        except OSError as exc:
            self.handler.errors.error("udp_send_failed", error=repr(exc))


class DnsTcpServer(StreamServer):
    """TCP on one address (RFC 7766): length-framed, pipelined, answered as each completes."""

    def __init__(self, listener, handler: QueryHandler, max_connections: int, idle_timeout: float) -> None:
        super().__init__(listener, handle=self.handle_connection, spawn=gevent.pool.Pool(max_connections))
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.idle_connections: dict = {}  # greenlet -> whether it answered a query already

    def handle_connection(self, sock, address) -> None:
        try:
            host = address[0]
            allowed = self.handler.access.decisions.get(host)
            self._serve(sock, allowed if allowed is not None else self.handler.access.decide(host))
        except Exception as exc:
            self.handler.errors.error("tcp_handler_failed", error=repr(exc))
        finally:
            sock.close()

    def _serve(self, sock, allowed: bool) -> None:
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

    def _resolve_and_send(self, sock, write_lock, query: wire.Query, started: float) -> None:
        try:
            _send_framed(sock, write_lock, self.handler.resolve(query, TCP_MAX, "tcp", started))
        except (OSError, TimeoutError):
            pass
        except Exception as exc:
            self.handler.errors.error("tcp_handler_failed", error=repr(exc))

    def close_idle(self) -> None:
        """At shutdown: close connections that wait for a next query; busy ones finish.

        A connection that has not sent its first query yet gets FIRST_QUERY_WAIT more: its client
        connected to ask one, which may be on its way (during a takeover, issue 9).
        """
        for greenlet, served in list(self.idle_connections.items()):
            if served:
                greenlet.kill(block=False)
            else:
                gevent.spawn_later(FIRST_QUERY_WAIT, self._close_if_idle, greenlet)

    def _close_if_idle(self, greenlet) -> None:
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
        accepted = []
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


def _send_framed(sock, write_lock, answer: bytes) -> None:
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
        # SO_REUSEPORT on both, on purpose (issue 9): during a takeover the new proxy binds while the
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
        if freebind and family == socket.AF_INET:
            udp.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            tcp.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        udp.bind(address)
        tcp.bind((endpoint.host, udp.getsockname()[1]))
        tcp.listen(1024)
    except OSError:
        udp.close()
        tcp.close()
        raise
    return udp, tcp


class Proxy:
    """The whole running proxy: cache, upstreams, resolver and one UDP and one TCP server per address."""

    def __init__(self, config: Config, log) -> None:
        self.config = config
        self.log = log
        self.cache = AnswerCache(config.cache_size)
        self.metrics = Metrics()
        self.upstreams = Upstreams(
            config.upstreams,
            config.upstream_timeout,
            config.deadline,
            config.force_tcp,
            log,
            on_result=self.metrics.on_upstream_result,
        )
        self.resolver = Resolver(config, self.cache, self.upstreams, log)
        self.pool = TaskLimit(config.max_concurrent, self.resolver.errors)
        self.handler = QueryHandler(
            self.resolver, self.pool, log, config.log_queries, AccessList(config.allow), self.metrics
        )
        self.servers: list[DatagramServer | StreamServer] = []
        self.background: list[gevent.Greenlet] = []
        self.stopping = gevent.event.Event()
        self.persister: CachePersister | None = None
        if config.cache_file:
            self.persister = CachePersister(config.cache_file, self.cache, config.max_stale, log)
        self.interceptor: Interceptor | None = None
        self.sync_greenlet: gevent.Greenlet | None = None
        self.rules_ok = True
        self.serving = False
        if config.intercept != "none":
            spec = InterceptSpec(
                mode=config.intercept,
                local_ips=config.local_ips,
                port=config.listen[0].port,
                dnat_target=str(config.dnat_target) if config.dnat_target else None,
                health_port=config.http.port if config.http and config.http.host in config.local_ips else None,
            )
            self.interceptor = Interceptor(spec, log, runner=gevent.subprocess.run)
        # The interception is node state shared with a successor or predecessor (issue 9).
        self.registry: InstanceRegistry | None = None
        if self.interceptor is not None:
            self.registry = InstanceRegistry(config.state_dir, log)
        self.http: HttpApi | None = None
        if config.http is not None:
            self.http = HttpApi(config.http, config.listen[0], self.readiness, log)
            registry = make_registry(self, self.metrics)
            self.http.add_route("/metrics", lambda environ: ("200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)))
            control = CacheControl(self.cache, time.monotonic, log)
            self.http.add_route("/cache", loopback_only(control.show))
            self.http.add_route("/cache/purge", loopback_only(control.purge))

    def start(self) -> None:
        """Load the cache, bind, serve, then set up interception (NodeLocal DNSCache's order).

        Raises OSError when a socket cannot be bound and InterceptError when the rules cannot be set.
        """
        if self.registry is not None:
            with self.registry.locked():
                # Leftovers of a run killed with -9 go; with a live instance on the node (a takeover)
                # its rules and addresses are ours as well and stay.
                if not self.registry.peers():
                    self.interceptor.remove_leftovers()
                self.registry.register()
        if self.persister is not None:
            self.persister.load()  # before the sockets serve: the first queries see the loaded cache
        for endpoint in self.config.listen:
            udp, tcp = bind_sockets(endpoint, freebind=self.interceptor is not None)
            bound = Endpoint(endpoint.host, udp.getsockname()[1])
            self.servers.append(DnsUdpServer(udp, self.handler))
            self.servers.append(
                DnsTcpServer(tcp, self.handler, self.config.max_tcp_connections, self.config.tcp_idle_timeout)
            )
            self.log.info("listening", address=str(bound), protocols=["udp", "tcp"])
            shared = other_sockets(bound.host, bound.port)
            if shared:
                # Expected during a takeover; otherwise a second proxy of ours runs by mistake.
                self.log.info("listen_address_shared", address=str(bound), other_sockets=shared)
        for server in self.servers:
            server.start()
        self.background.append(gevent.spawn(policy.run_prober, self.resolver))
        self.background.append(gevent.spawn(self._housekeeping))
        if self.persister is not None:
            self.persister.start(self.config.save_interval)
        if self.registry is not None:
            # One step under the node's lock: a predecessor deciding whether to hand over sees us
            # either still starting or serving with the rules installed (issue 9).
            with self.registry.locked():
                self.interceptor.add_addresses()
                try:
                    self.interceptor.install_rules()
                    self.registry.keep_node_facts(self.interceptor)
                    if self.http is not None:
                        self.http.start()  # after the addresses: it may listen on the link-local one
                except (InterceptError, OSError):
                    if not self.registry.peers():
                        self.registry.tear_down_last(self.interceptor)  # alone on the node: leave nothing behind
                    raise
                self.registry.set_state(SERVING)
            self.sync_greenlet = gevent.spawn(self._sync_interception)
        elif self.http is not None:
            self.http.start()
        self.serving = True
        self.log.info("serving", instances_on_node=1 + len(self.registry.peers()) if self.registry else None)

    def upstream_groups(self) -> list[Upstreams]:
        """Every set of upstreams the proxy forwards to (for probing, metrics and the summary)."""
        return self.resolver.router.all_upstreams()

    def reconfigure(self, config: Config) -> None:
        """Swap in a reloaded Config whose restart-only settings are the running ones (configfile.py).

        The cache and the sockets stay; new routes keep the health of unchanged upstreams. Nothing
        here yields, so no query sees half of the change.
        """
        resolver = self.resolver
        resolver.router = policy.build_router(config, self.log, previous=resolver.router)
        resolver.prefetch_window = policy.prefetch_window(config)
        resolver.config = config
        self.handler.log_queries = config.log_queries
        if config.allow != self.config.allow:
            self.handler.access = AccessList(config.allow)
        self.upstreams = resolver.router.default.upstreams
        self.config = config

    def readiness(self) -> tuple[bool, str]:
        """Ready once the cache is loaded, the sockets serve and interception (if any) is in place."""
        if not self.serving:
            return False, "starting"
        if not self.rules_ok:
            return False, "interception rules missing"
        if self.registry is not None and self.registry.newer_starting():
            # One port for both during a takeover (SO_REUSEPORT): a probe of the successor's pod
            # may reach us, and the successor is not ready until it serves.
            return False, "successor starting"
        return True, "ready"

    def _sync_interception(self) -> None:
        while True:
            gevent.sleep(self.config.sync_interval)
            with self.registry.locked():  # two instances of a takeover never insert the same rule twice
                restored = self.interceptor.sync()
            self.rules_ok = self.interceptor.rules_present() if restored else True

    def _housekeeping(self) -> None:
        last_summary = time.monotonic()
        previous = self.resolver.counters.as_dict()
        while True:
            gevent.sleep(1.0)
            self.resolver.report_stale_episode()
            interval = self.config.summary_interval
            if interval and time.monotonic() - last_summary >= interval:
                last_summary = time.monotonic()
                previous = self._log_summary(previous)

    def _log_summary(self, previous: dict[str, int]) -> dict[str, int]:
        """One line per interval for cluster logging: what happened since the last one."""
        now = self.resolver.counters.as_dict()
        delta = {name: now[name] - previous.get(name, 0) for name in now}
        answered_from_cache = delta["hits"] + delta["stale_served"]
        lookups = answered_from_cache + delta["misses"]
        fresh, stale = self.cache.counts(time.monotonic())
        self.log.info(
            "summary",
            queries=delta["queries"],
            hit_ratio=round(answered_from_cache / lookups, 3) if lookups else None,
            stale_served=delta["stale_served"],
            servfail=delta["servfail"],
            cache_entries=fresh + stale,
            cache_stale_entries=stale,
            upstreams_down=[str(s.endpoint) for g in self.upstream_groups() for s in g.servers if s.down],
        )
        return now

    def stop(self) -> None:
        """Hand over or fall back, answer every query already received within the grace time, then stop.

        With a successor serving on the node (a takeover, issue 9) the interception stays, it is
        the successor's now; otherwise the rules go first (fallback to kube-dns, issue 4). Either
        way the sockets leave the SO_REUSEPORT group before we stop reading them, so no query the
        kernel gave us is dropped, and the last instance out removes the addresses.
        """
        self.serving = False
        handed_over = False
        if self.interceptor is not None:
            if self.sync_greenlet is not None:
                self.sync_greenlet.kill()
            handed_over = self._hand_over_interception()
        if handed_over and self.http is not None:
            self.http.stop()  # from now on the kubelet's probes reach the successor only
        deadline = time.monotonic() + self.config.grace
        udp_servers = [server for server in self.servers if isinstance(server, DnsUdpServer)]
        for server in udp_servers:
            try:
                detach_udp(server.socket)  # new datagrams go to the group's other sockets
            except OSError as exc:
                self.log.warning("udp_detach_failed", error=str(exc))
        for server in self.servers:
            if isinstance(server, DnsTcpServer):
                server.hand_over()  # the listener only; open connections finish their queries
                server.close_idle()
        for server in udp_servers:
            wait_until_read(server.socket, deadline)  # what the kernel queued for us before the detach
            server.stop_accepting()  # the socket stays open to send the answers in flight
        self.pool.join(timeout=max(0.0, deadline - time.monotonic()))
        for server in self.servers:
            if server.pool is not None:
                server.pool.join(timeout=max(0.0, deadline - time.monotonic()))
                server.pool.kill(block=True, timeout=1)
        self.pool.kill(block=True, timeout=1)
        self.resolver.fetch_pool.kill(block=True, timeout=1)
        gevent.killall(self.background, block=True, timeout=1)
        for server in self.servers:
            server.close()
        if self.persister is not None:
            self.persister.stop()  # the final snapshot, once no query can change the cache any more
        if self.http is not None and not handed_over:
            self.http.stop()
        if self.registry is not None:
            with self.registry.locked():
                if not self.registry.peers():
                    # The last one out: the addresses, now that no answer is in flight.
                    self.registry.tear_down_last(self.interceptor)
                self.registry.unregister()
        c = self.resolver.counters
        self.log.info("stopped", handed_over=handed_over, **c.as_dict())

    def _hand_over_interception(self) -> bool:
        """True when a successor serves and keeps the interception; else the rules are removed.

        A successor that registered but does not serve yet gets up to --handover-timeout, during
        which we keep answering as before. The decision is taken under the node's lock, where the
        successor's "serving" means its rules are installed.
        """
        registry = self.registry
        registry.set_state(STOPPING)
        waited_until = time.monotonic() + self.config.handover_timeout
        while time.monotonic() < waited_until:
            peers = registry.peers()
            if any(p.state == SERVING for p in peers) or not any(p.state == STARTING for p in peers):
                break
            gevent.sleep(0.05)
        with registry.locked():
            successors = [p.id for p in registry.peers() if p.state == SERVING]
            if successors:
                self.log.info("handover", successors=successors)
                return True
            # Alone, or the successor is late: new queries fall back to kube-dns at once while ours
            # drain (issue 4); a successor that comes up later installs the rules again.
            self.interceptor.remove_rules()
            return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["watchdog"]:
        import watchdog

        return watchdog.main(argv[1:])
    if argv[:1] == ["cache"]:
        return control_cli(argv[1:])
    config = config_module.main_config(argv)
    log = configure_logging(config.log_level)
    log.info("starting", config=config_module.describe(config))
    stop = gevent.event.Event()
    # Python as PID 1 ignores SIGTERM unless a handler is installed; installed before interception
    # is set up, so a SIGTERM during start still tears it down.
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    try:
        proxy = Proxy(config, log)
        reloader = ConfigReloader(argv, proxy, log)  # notes the --config file as read, before serving
        proxy.start()
    except OSError as exc:
        log.error("bind_failed", error=str(exc))
        return 1
    except InterceptError as exc:
        log.error("intercept_failed", error=str(exc))
        return 1
    reloader.start()  # --config changes and SIGHUP apply settings live, without dropping the cache
    stop.wait()
    reloader.stop()
    log.info("stopping", grace_seconds=proxy.config.grace)
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
