"""The query engine: fresh hits, stale answers (RFC 8767), coalescing, prefetch, and what is stored.

Read top-down like CoreDNS's cache handler: look the key up; serve it fresh; else serve it stale
and refresh; else forward, store and answer. Everything the proxy does during an outage is here,
and how it ends (upstream_up: failure marks cleared, the names answered stale refreshed); the
servers (server.py) only parse, hand over and send, the upstreams (upstream.py) only forward.
Longer than the other modules for that reason: an outage's start and its end share their state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

import wire
from autopath import Autopath
from cache import AnswerCache, Entry, answer_ttl, entry_from_reply
from config import Config
from logs import RateLimitedLog
from metrics import Stats
from routing import Route, Router
from upstream import Server, UpstreamError, Upstreams

MAX_TEMPLATES = 20_000  # parsed queries kept for the hot path (about 6 MB at most)
RENDERED_PER_ENTRY = 8  # rendered answers kept per cache entry
DOWN_TRIES_PER_SECOND = 5  # misses forwarded anyway while every upstream is marked down
STALE_EPISODE_QUIET = 5.0  # seconds without a stale answer that end a stale-serving episode
INVALID_TLD = wire.name_to_wire("invalid.")
RECOVERY_NAMES = 10_000  # names answered stale remembered for the refresh after an outage (about 1.5 MB)


class TaskLimit:
    """Greenlets for queries beyond cache hits, at most `limit` at once: a full limit refuses.

    gevent.spawn_raw without a Pool's Greenlet objects, links and semaphore: a miss costs one
    light spawn (measured: Pool.spawn was a sixth of the miss path's time).
    """

    def __init__(self, limit: int, errors: RateLimitedLog) -> None:
        self.limit = limit
        self.errors = errors
        self.active: set[Any] = set()
        self.idle = gevent.event.Event()
        self.idle.set()

    def __len__(self) -> int:
        return len(self.active)

    def full(self) -> bool:
        return len(self.active) >= self.limit

    def spawn(self, function: Callable[..., object], *args: Any) -> None:
        self.idle.clear()
        self.active.add(gevent.spawn_raw(self._run, function, args))

    def _run(self, function: Callable[..., object], args: tuple[Any, ...]) -> None:
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
        return bool(self.idle.wait(timeout))

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        for greenlet in list(self.active):
            gevent.kill(greenlet)
        if block:
            self.idle.wait(timeout)


def is_positive(entry: Entry) -> bool:
    """NOERROR with at least one answer record."""
    return entry.rcode == wire.NOERROR and entry.wire[6:8] != b"\x00\x00"


def is_negative(entry: Entry) -> bool:
    """NXDOMAIN, or NODATA: NOERROR with no answer record (RFC 2308 §2.2)."""
    return entry.rcode == wire.NXDOMAIN or (entry.rcode == wire.NOERROR and entry.wire[6:8] == b"\x00\x00")


def in_trouble(upstreams: Upstreams, grace: float, now: float) -> bool:
    """True while every server of a route is down, or for `grace` seconds after one came back up."""
    if upstreams.all_down():
        return True
    return any(now - server.up_since < grace for server in upstreams.servers)


def prefetch_window(config: Config) -> float:
    """The share of an entry's TTL, at its end, in which a hit starts a prefetch; 0.0 when off."""
    return config.prefetch_percent / 100 if config.prefetch else 0.0


class Resolver:
    """The per-query flow: fresh hit, stale answer, miss; one upstream query per key in flight."""

    def __init__(
        self,
        config: Config,
        cache: AnswerCache,
        router: Router,
        stats: Stats,
        log: Any,
        timer: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = gevent.sleep,
    ) -> None:
        self.config = config
        self.cache = cache
        self.router = router  # per-zone upstreams and TTL bounds (--forward); swapped on reload
        self.stats = stats
        self.log = log
        self.errors = RateLimitedLog(log)
        self.timer = timer
        self.sleep = sleep  # the recovery refresh's pacing; tests inject one that moves their clock
        self.prefetch_window = prefetch_window(config)  # 0.0: prefetch off
        self.hit_metrics = not config.no_metrics
        self.inflight: dict[bytes, gevent.event.AsyncResult] = {}
        self.templates: dict[bytes, wire.Query] = {}
        self.fetch_pool = TaskLimit(config.max_concurrent, self.errors)
        self.down_window_start = 0.0
        self.down_window_tries = 0
        # The current stale-serving episode (None: not serving stale), for one log line at each end.
        self.stale_since: float | None = None
        self.stale_in_episode = 0
        self.last_stale_at = 0.0
        self.names_in_episode = 0  # distinct names answered stale, counted up to RECOVERY_NAMES
        self.recovered_at: float | None = None  # the episode's last upstream_up
        self.refreshed_in_episode = 0
        self.refresh_failed_in_episode = 0
        # Names answered stale, with how many stale answers each, until their upstream is back; then
        # they wait in recovery_pending for the background refresh. Both at most RECOVERY_NAMES.
        self.stale_keys: dict[bytes, int] = {}
        self.recovery_pending: dict[bytes, int] = {}
        self.recovery_running = False
        self.recovery_sent_at = -math.inf  # when the last recovery refresh was sent (the pacing)
        self.autopath = Autopath(config, self) if config.autopath else None  # --autopath; None: off
        self.watch(router)

    def reconfigure(self, config: Config, router: Router) -> None:
        """Swap in a reloaded Config and its routes; nothing here yields, so no query sees half of it."""
        self.router = router
        self.prefetch_window = prefetch_window(config)
        self.autopath = Autopath(config, self, self.autopath) if config.autopath else None
        self.config = config
        self.watch(router)

    def watch(self, router: Router) -> None:
        """Be told when a server of the routes' upstreams is marked up again (upstream_up)."""
        for upstreams in router.all_upstreams():
            upstreams.on_up = self.upstream_up

    # -- fresh hits: the hot path ----------------------------------------------------------------

    def answer_fresh_udp(self, data: bytes) -> bytes | None:
        """The UDP answer to a query whose bytes (less the ID) were parsed before, from a fresh entry.

        None when the full path is needed: an unknown query or no fresh entry. No parse, no
        greenlet, no logging: the hot path does as little as it can.
        """
        query = self.templates.get(data[2:])
        if query is None:
            return None
        return self.answer_fresh(query, query.max_udp, "udp", data)

    def answer_fresh(self, query: wire.Query, max_size: int, proto: str, data: bytes | None = None) -> bytes | None:
        """The answer from a fresh cache entry, or None when the full path is needed.

        The one place a server answers a hit: UDP (through answer_fresh_udp, with `data` for the
        render memo) and TCP alike. Counts the hit by protocol, qtype and rcode unless --no-metrics.
        """
        entry = self.cache.lookup(query.key)
        if entry is None:
            return None
        remaining = entry.expires_at - self.timer()
        if remaining <= 0:
            return None
        if self.hit_metrics:
            stats = self.stats
            stats.queries_by_type[(proto, query.qtype)] += 1
            stats.responses[entry.rcode] += 1
        return self._serve_fresh(query, entry, remaining, max_size, data)

    def _serve_fresh(
        self, query: wire.Query, entry: Entry, remaining: float, max_size: int, data: bytes | None = None
    ) -> bytes:
        """The fresh-hit rules: TTL counted down in whole seconds, the hit counted, maybe a prefetch."""
        ttl = int(remaining)
        if remaining > ttl:
            ttl += 1  # ceil: the stored TTL less the whole seconds since it was stored
        entry.hits += 1
        self.stats.hits += 1
        if self.prefetch_window and remaining <= entry.ttl * self.prefetch_window:
            self._prefetch(query, entry)
        if data is None:
            return entry.render(query, ttl, max_size)
        # Clients repeat byte-identical queries: an answer rendered for this TTL second only needs
        # the client's ID swapped in.
        memo = entry.rendered
        if memo is None:
            if entry.hits < 2:
                # Most names of a large cache are asked once per TTL: a memo would cost them about
                # 400 bytes each for nothing. The second hit makes one.
                return entry.render(query, ttl, max_size, qid=data[:2])
            memo = entry.rendered = {}
        body = data[2:]
        if memo:
            rendered = memo.get(body)
            if rendered is not None and rendered[0] == ttl:
                return data[:2] + rendered[1][2:]
        answer = entry.render(query, ttl, max_size, qid=data[:2])
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

    # -- the full path ---------------------------------------------------------------------------

    def resolve(self, query: wire.Query, max_size: int) -> tuple[bytes, str]:
        """The answer and how it was found: hit, stale (the entry was stale on arrival), miss, local or
        autopath (a pod's search path walked for it: autopath.py).

        Never raises for upstream trouble: the answer is then stale or SERVFAIL.
        """
        if wire.key_qname(query.key).endswith(INVALID_TLD):
            # RFC 6761 §6.4: never sent upstream. Also what the health checks ask, so they do not
            # depend on kube-dns.
            return wire.error_response(query.wire, wire.NXDOMAIN, query), "local"
        autopath = self.autopath
        if autopath is not None:
            plan = autopath.plan(query)  # None unless A/AAAA of a pod's first search candidate
            if plan is not None:
                return autopath.resolve(query, plan, max_size)
        return self.resolve_plain(query, max_size)

    def resolve_plain(self, query: wire.Query, max_size: int) -> tuple[bytes, str]:
        """resolve() without --autopath: the cache entry of query.key, fresh, stale or fetched."""
        now = self.timer()
        entry = self.cache.lookup(query.key)
        if entry is not None:
            remaining = entry.expires_at - now
            if remaining > 0:
                return self._serve_fresh(query, entry, remaining, max_size), "hit"
            if self.config.serve_stale and entry.stale_for(now) <= self.config.max_stale:
                return self._stale_path(query, entry, now, max_size), "stale"
        self.stats.misses += 1
        return self._miss_path(query, max_size), "miss"

    def _stale_path(self, query: wire.Query, entry: Entry, now: float, max_size: int) -> bytes:
        route = self.router.route_for(query.key)
        if entry.retry_after > now or route.upstreams.all_down():
            # RFC 8767 §5: after a failure, answer stale at once and recheck at most every
            # failure_recheck seconds, in the background.
            if entry.retry_after <= now:
                entry.retry_after = now + self.config.failure_recheck
                self._fetch(query)
            return self._stale(query, entry, route, max_size)
        pending = self._fetch(query)
        if pending is not None:
            # RFC 8767 client response timer: wait a little for fresh data, then answer stale;
            # the refresh goes on in the background.
            pending.wait(self.config.stale_answer_timeout)
            fresh = self._usable(pending)
            if fresh is not None:
                return fresh.render(query, answer_ttl(fresh, self.timer()), max_size)
        entry.retry_after = self.timer() + self.config.failure_recheck
        return self._stale(query, entry, route, max_size)

    def _miss_path(self, query: wire.Query, max_size: int) -> bytes:
        if self.router.route_for(query.key).upstreams.all_down():
            # Known down: SERVFAIL at once. A few misses a second still go upstream in the
            # background, so the first answer ends the outage without a flood of doomed tries.
            if query.key in self.inflight or self._may_try_while_down():
                self._fetch(query)
            return self._servfail(query)
        # The first asker fetches in its own greenlet (one spawn less per miss); identical
        # queries arriving meanwhile wait on its result.
        pending = self._fetch_inline(query)
        pending.wait(self.config.deadline)
        fresh = self._usable(pending)
        if fresh is not None:
            return fresh.render(query, answer_ttl(fresh, self.timer()), max_size)
        return self._servfail(query)

    @staticmethod
    def _usable(pending: gevent.event.AsyncResult) -> Entry | None:
        """The upstream's answer if it came and may be given to clients: NOERROR or NXDOMAIN."""
        if pending.successful():
            fresh: Entry = pending.value
            if fresh.rcode in (wire.NOERROR, wire.NXDOMAIN):
                return fresh
        return None

    def _may_try_while_down(self) -> bool:
        """At most DOWN_TRIES_PER_SECOND background tries a second while every upstream is down."""
        now = self.timer()
        if now - self.down_window_start >= 1.0:
            self.down_window_start, self.down_window_tries = now, 0
        self.down_window_tries += 1
        return self.down_window_tries <= DOWN_TRIES_PER_SECOND

    def _stale(self, query: wire.Query, entry: Entry, route: Route, max_size: int) -> bytes:
        """A stale answer: TTL --stale-ttl and EDE 3 "Stale Answer" (RFC 8767 §4, RFC 8914)."""
        stats = self.stats
        stats.stale_served += 1
        now = self.timer()
        self.last_stale_at = now
        self.stale_in_episode += 1
        stats.stale_max_age = max(stats.stale_max_age, entry.stale_for(now))
        # Remembered for the refresh once the upstream is back: a dict update, bounded.
        stale_keys = self.stale_keys
        count = stale_keys.get(query.key)
        if count is not None:
            stale_keys[query.key] = count + 1
        elif len(stale_keys) < RECOVERY_NAMES:
            stale_keys[query.key] = 1
            self.names_in_episode += 1
        if self.stale_since is None:
            self.stale_since = now
            self.log.warning(
                "stale_serving_started",
                qname=query.qname,
                stale_seconds=round(entry.stale_for(now), 1),
                upstreams_down=[str(s.endpoint) for s in route.upstreams.servers if s.down],
            )
        return entry.render(query, self.config.stale_ttl, max_size, stale=True)

    def _servfail(self, query: wire.Query) -> bytes:
        self.stats.servfail += 1
        ede = wire.EDE_NO_REACHABLE_AUTHORITY if query.edns else None
        return wire.error_response(query.wire, wire.SERVFAIL, query, ede)

    def report_stale_episode(self) -> None:
        """Close a stale-serving episode once no stale answer was needed for a while (one line, not one per answer).

        Not while the recovery refresh runs: the line gives its figures. recovery_seconds: from the
        last upstream_up to the last stale answer (None: no upstream came back in the episode).
        """
        if self.stale_since is None or self.recovery_running:
            return
        if self.timer() - self.last_stale_at >= STALE_EPISODE_QUIET:
            recovered_at = self.recovered_at
            recovery = None if recovered_at is None else round(max(0.0, self.last_stale_at - recovered_at), 3)
            self.log.info(
                "stale_serving_ended",
                stale_answers=self.stale_in_episode,
                duration_seconds=round(self.last_stale_at - self.stale_since, 1),
                names_served_stale=self.names_in_episode,
                recovery_seconds=recovery,
                refreshed=self.refreshed_in_episode,
                refresh_failed=self.refresh_failed_in_episode,
            )
            self.stale_since = None
            self.stale_in_episode = self.names_in_episode = 0
            self.refreshed_in_episode = self.refresh_failed_in_episode = 0
            self.recovered_at = None
            self.stats.stale_max_age = 0.0
            if not any(server.down for upstreams in self.router.all_upstreams() for server in upstreams.servers):
                # Stale for failures of their own (SERVFAIL, a slow name), not an outage: nothing to recover.
                self.stale_keys.clear()

    # -- the end of an outage: upstream_up -----------------------------------------------------------

    def upstream_up(self, upstreams: Upstreams, server: Server) -> None:
        """A server marked down answers again (Upstreams.on_up): end the outage of the names routed to it.

        Their failure marks (RFC 8767 §5) go, so the next query of each waits for fresh data within
        the client timer instead of getting stale at once until --failure-recheck; the names answered
        stale meanwhile are then refreshed in the background (_run_recovery). One pass over the
        marked entries, no yield: this runs inside a probe or an upstream try.
        """
        now = self.timer()
        route_for = self.router.route_for
        for key, entry in self.cache.retry_marked(now):
            if route_for(key).upstreams is upstreams:
                entry.retry_after = 0.0
        if self.stale_since is not None:
            self.recovered_at = now
        stale_keys = self.stale_keys
        pending = self.recovery_pending
        refresh = self.config.recovery_refresh_rate > 0
        for key in [key for key in stale_keys if route_for(key).upstreams is upstreams]:
            count = stale_keys.pop(key)
            if refresh and (key in pending or len(pending) < RECOVERY_NAMES):
                pending[key] = pending.get(key, 0) + count
        if pending and not self.recovery_running:
            self.recovery_running = True
            self.fetch_pool.spawn(self._run_recovery)

    def _run_recovery(self) -> None:
        """Refresh the names answered stale in an outage, most asked first, --recovery-refresh-rate a second at most.

        Through the normal fetch path: coalesced with the clients' own refreshes, stored like any
        answer. A name already fresh again (a client asked first), evicted or in flight costs no
        query; one whose servers are all down again waits for their next upstream_up. The sends
        are spaced 1/rate apart, so kube-dns, just back, never gets a burst from us.
        """
        outstanding: list[gevent.event.AsyncResult] = []
        try:
            while self.recovery_pending:
                cache = self.cache
                batch = sorted(
                    self.recovery_pending.items(),
                    key=lambda item: (item[1], getattr(cache.get(item[0]), "hits", 0)),
                    reverse=True,
                )
                self.recovery_pending = {}
                for key, count in batch:
                    if not self._needs_recovery(key, count):
                        continue
                    rate = self.config.recovery_refresh_rate
                    if rate <= 0:  # turned off by a reload
                        self.recovery_pending.clear()
                        return
                    wait = self.recovery_sent_at + 1.0 / rate - self.timer()
                    if wait > 0:
                        self.sleep(wait)
                        if not self._needs_recovery(key, count):
                            continue
                    pending = self._fetch_key(key, wire.key_question_wire(key), *wire.key_flags(key))
                    if pending is None:  # the background pool is full
                        self.refresh_failed_in_episode += 1
                        continue
                    self.recovery_sent_at = self.timer()
                    self.stats.recovery_refreshes += 1
                    pending.rawlink(self._recovery_refreshed)
                    outstanding = [result for result in outstanding if not result.ready()]
                    outstanding.append(pending)
            if outstanding:
                # The episode's line waits for the answers of the last refreshes (one deadline at most).
                gevent.wait(outstanding, timeout=self.config.deadline)
        finally:
            self.recovery_running = False

    def _needs_recovery(self, key: bytes, count: int) -> bool:
        """True if the name is still cached and stale, not in flight nor failed since, and its upstream
        is up; put back with the stale names if its servers are all down again."""
        entry = self.cache.get(key)  # Cache.get: no LRU touch
        now = self.timer()
        if entry is None or entry.expires_at > now or entry.retry_after > now or key in self.inflight:
            return False
        if self.router.route_for(key).upstreams.all_down():
            if key in self.stale_keys or len(self.stale_keys) < RECOVERY_NAMES:
                self.stale_keys[key] = self.stale_keys.get(key, 0) + count
            return False
        return True

    def _recovery_refreshed(self, pending: gevent.event.AsyncResult) -> None:
        if self._usable(pending) is not None:
            self.refreshed_in_episode += 1
        else:
            self.refresh_failed_in_episode += 1

    # -- upstream fetches: coalesced, stored -----------------------------------------------------

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
            self.stats.prefetches += 1

    def fresh_entry(self, key: bytes, deadline: float) -> Entry | None:
        """A fresh NOERROR or NXDOMAIN for key by the monotonic deadline, from the cache or fetched (joined if
        in flight); None for SERVFAIL or REFUSED, no reply in time, every server down, or a refresh that
        failed less than --failure-recheck ago. What --autopath asks for each later search candidate.
        """
        entry = self.cache.lookup(key)
        now = self.timer()
        if entry is not None:
            if entry.expires_at > now:
                return entry
            if entry.retry_after > now:
                return None  # RFC 8767 §5: a refresh failed recently
        if self.router.route_for(key).upstreams.all_down():
            return None
        pending = self._fetch_key(key, wire.key_question_wire(key), *wire.key_flags(key))
        if pending is None:  # the background pool is full
            return None
        pending.wait(max(0.0, deadline - now))  # on timeout the fetch goes on and is stored for the next walk
        fresh = self._usable(pending)
        if fresh is None and entry is not None and pending.ready():
            entry.retry_after = self.timer() + self.config.failure_recheck
        return fresh

    def _fetch(self, query: wire.Query) -> gevent.event.AsyncResult | None:
        """The pending upstream answer for this key: joined if one is in flight, else started in the
        background; None when the background pool is full."""
        return self._fetch_key(query.key, query.question, query.do, query.cd)

    def _fetch_key(self, key: bytes, question: bytes, do: bool, cd: bool) -> gevent.event.AsyncResult | None:
        pending = self._joined(key)
        if pending is not None:
            return pending
        if self.fetch_pool.full():
            return None
        pending = self.inflight[key] = gevent.event.AsyncResult()
        self.fetch_pool.spawn(self._run_fetch, key, question, do, cd, pending)
        return pending

    def _fetch_inline(self, query: wire.Query) -> gevent.event.AsyncResult:
        """Like _fetch, but a new fetch runs in the calling greenlet and is done on return."""
        pending = self._joined(query.key)
        if pending is not None:
            return pending
        pending = self.inflight[query.key] = gevent.event.AsyncResult()
        self._run_fetch(query.key, query.question, query.do, query.cd, pending)
        return pending

    def _joined(self, key: bytes) -> gevent.event.AsyncResult | None:
        pending = self.inflight.get(key)
        if pending is not None:
            self.stats.coalesced += 1
        return pending

    def _run_fetch(self, key: bytes, question: bytes, do: bool, cd: bool, pending: gevent.event.AsyncResult) -> None:
        try:
            route = self.router.route_for(key)
            reply = route.upstreams.query(question, do, cd)
            now = self.timer()
            fresh, cacheable = entry_from_reply(reply, route.policy, now)
            if self._holds_positive(key, route, fresh, now):
                # The upstream is in trouble and denies a name we know: keep ours (--prefer-positive).
                self.stats.negative_held += 1
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

    def _holds_positive(self, key: bytes, route: Route, reply: Entry, now: float) -> bool:
        """--prefer-positive: True when a negative reply must not replace the positive entry we hold.

        Only an entry we may still serve counts (fresh, or stale within --max-stale): the held
        positive answer is then served instead, stale if expired. Trade-off: a name really deleted
        while kube-dns is in trouble keeps resolving until the grace has passed.
        """
        config = self.config
        if not config.prefer_positive or not is_negative(reply):
            return False
        held = self.cache.lookup(key)
        if held is None or not is_positive(held):
            return False
        if held.expires_at <= now and not (config.serve_stale and held.stale_for(now) <= config.max_stale):
            return False
        return in_trouble(route.upstreams, config.prefer_positive_grace, now)
