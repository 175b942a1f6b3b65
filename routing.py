"""Routing: which upstream servers a qname is forwarded to (--forward zones), and their TTL bounds."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import wire
from cache import TtlPolicy
from config import Config, Endpoint, ForwardZone
from upstream import Upstreams


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
        """The route of a cache key; miss path only."""
        zones = self.zones
        if not zones:
            return self.default
        name = wire.key_qname(key)
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
        return int(getattr(config, name) if value is None else value)

    return TtlPolicy(pick("min_ttl"), pick("max_ttl"), pick("max_negative_ttl"))


def build_router(
    config: Config,
    log: Any,
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
    on_dropped = template.on_dropped if template is not None else None

    def upstreams_for(endpoints: tuple[Endpoint, ...], force_tcp: bool) -> Upstreams:
        upstreams = known.get((endpoints, force_tcp))
        if upstreams is None:
            upstreams = Upstreams(
                endpoints, config.upstream_timeout, config.deadline, force_tcp, log, on_result, on_dropped=on_dropped
            )
            known[(endpoints, force_tcp)] = upstreams  # zones with the same servers share their health
        upstreams.try_timeout = config.upstream_timeout
        upstreams.deadline = config.deadline
        return upstreams

    default_route = Route(".", upstreams_for(config.upstreams, config.force_tcp), ttl_policy(config))
    zones = [
        (
            wire.name_to_wire(zone.zone),
            Route(
                zone.zone,
                upstreams_for(zone.upstreams, config.force_tcp or zone.force_tcp),
                ttl_policy(config, zone),
            ),
        )
        for zone in config.forward
    ]
    return Router(default_route, zones)
