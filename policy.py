"""Cache policy beyond the core: per-zone forwarding routes, prefetch, and preferring positive answers."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import gevent

import wire
from cache import Entry, TtlPolicy
from config import Config, Endpoint, ForwardZone
from upstream import Upstreams

KEY_TAIL = 5  # a cache key is the lower-cased qname, then qtype, qclass and one flags byte (wire.py)


@dataclass(frozen=True)
class Route:
    """Where the names of one zone are forwarded, and the TTL bounds their answers are cached with."""

    zone: str  # "." for the default route (--upstream)
    upstreams: Upstreams
    policy: TtlPolicy


class Router:
    """Picks the route of a query by its qname: the longest --forward zone it is in, else the default."""

    def __init__(self, default: Route, zones: Iterable[tuple[bytes, Route]] = ()) -> None:
        self.default = default
        self.zones: dict[bytes, Route] = dict(zones)

    def route_for(self, key: bytes) -> Route:
        """The route of a cache key (lower-cased qname in wire form + KEY_TAIL bytes); miss path only."""
        zones = self.zones
        if not zones:
            return self.default
        name = key[:-KEY_TAIL]
        # Suffixes are tried at label boundaries only, from the longest: "xcluster.local" is not
        # in "cluster.local", and a label holding the bytes of another cannot fool the match.
        offset = 0
        end = len(name)
        while offset < end:
            route = zones.get(name[offset:])
            if route is not None:
                return route
            length = name[offset]
            if length == 0 or length & 0xC0:
                break
            offset += length + 1
        return self.default

    def all_upstreams(self) -> list[Upstreams]:
        """Every distinct Upstreams of the routes, the default first."""
        seen: list[Upstreams] = [self.default.upstreams]
        for route in self.zones.values():
            if all(route.upstreams is not u for u in seen):
                seen.append(route.upstreams)
        return seen


def ttl_policy(config: Config, zone: ForwardZone | None = None) -> TtlPolicy:
    """The TTL bounds of a route: the zone's own where it sets them, the global ones otherwise."""

    def pick(name: str) -> int:
        value = getattr(zone, name) if zone is not None else None
        return getattr(config, name) if value is None else value

    return TtlPolicy(pick("min_ttl"), pick("max_ttl"), pick("max_negative_ttl"))


def build_router(
    config: Config,
    log,
    default: Upstreams | None = None,
    previous: Router | None = None,
) -> Router:
    """The routes of a configuration, each zone with its own Upstreams (its own health).

    default: the Upstreams of --upstream, used as it is (at start). previous: the router being
    replaced by a reload; its Upstreams are kept where servers and transport are unchanged, so
    health and counters survive, and get the new timeouts.
    """
    known: dict[tuple[tuple[Endpoint, ...], bool], Upstreams] = {}
    if previous is not None:
        for upstreams in previous.all_upstreams():
            known[(tuple(s.endpoint for s in upstreams.servers), upstreams.force_tcp)] = upstreams
    if default is not None:
        known[(tuple(s.endpoint for s in default.servers), default.force_tcp)] = default
    template = default or (previous.default.upstreams if previous is not None else None)
    on_result = template.on_result if template is not None else None

    def upstreams_for(endpoints: tuple[Endpoint, ...], force_tcp: bool) -> Upstreams:
        upstreams = known.get((endpoints, force_tcp))
        if upstreams is None:
            upstreams = Upstreams(endpoints, config.upstream_timeout, config.deadline, force_tcp, log, on_result)
            known[(endpoints, force_tcp)] = upstreams  # zones with the same servers share their health
        upstreams.try_timeout = config.upstream_timeout
        upstreams.deadline = config.deadline
        return upstreams

    default_route = Route(".", upstreams_for(config.upstreams, config.force_tcp), ttl_policy(config))
    zones = [
        (
            zone.zone_wire,
            Route(
                zone.zone,
                upstreams_for(zone.upstreams, config.force_tcp or zone.force_tcp),
                ttl_policy(config, zone),
            ),
        )
        for zone in config.forward
    ]
    return Router(default_route, zones)


def prefetch_window(config: Config) -> float:
    """The share of an entry's TTL, at its end, in which a hit starts a prefetch; 0.0 when off."""
    return config.prefetch_percent / 100 if config.prefetch else 0.0


def is_positive(entry: Entry) -> bool:
    """NOERROR with at least one answer record."""
    return entry.rcode == wire.NOERROR and entry.wire[6:8] != b"\x00\x00"


def is_negative(entry: Entry) -> bool:
    """NXDOMAIN, or NODATA: NOERROR with no answer record (RFC 2308 §2.2)."""
    return entry.rcode == wire.NXDOMAIN or (entry.rcode == wire.NOERROR and entry.wire[6:8] == b"\x00\x00")


def in_trouble(upstreams: Upstreams, grace: float, now: float | None = None) -> bool:
    """True while every server of a route is down, or for `grace` seconds after one came back up."""
    if upstreams.all_down():
        return True
    now = time.monotonic() if now is None else now
    return any(now - server.up_since < grace for server in upstreams.servers)


def keeps_positive(config: Config, route: Route, held: Entry | None, reply: Entry, now: float) -> bool:
    """--prefer-positive: True when a negative reply must not replace the positive entry we hold.

    Only an entry we may still serve counts (fresh, or stale within --max-stale): the held
    positive answer is then served instead, stale if expired. Trade-off: a name really deleted
    while kube-dns is in trouble keeps resolving until the grace has passed.
    """
    if held is None or not is_negative(reply) or not is_positive(held):
        return False
    if held.expires_at <= now and not (config.serve_stale and held.stale_for(now) <= config.max_stale):
        return False
    return in_trouble(route.upstreams, config.prefer_positive_grace)


def run_prober(resolver) -> None:
    """Forever: every --failure-recheck seconds, probe the down servers of every route at once (RFC 8767 §5)."""
    while True:
        interval = resolver.config.failure_recheck
        gevent.sleep(interval)
        probes = [
            gevent.spawn(_probe_down, upstreams, min(upstreams.try_timeout, interval))
            for upstreams in resolver.router.all_upstreams()
            if any(server.down for server in upstreams.servers)
        ]
        gevent.joinall(probes)


def _probe_down(upstreams: Upstreams, timeout: float) -> None:
    for server in upstreams.servers:
        if server.down:
            upstreams.probe(server, timeout)
