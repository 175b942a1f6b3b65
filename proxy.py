"""Entry point and composition root: build the parts from one Config, run them, stop them; the CLI.

The parts: the cache (cache.py), the upstreams and their routes (upstream.py, routing.py), the
query engine (resolver.py), the UDP and TCP servers (server.py), the HTTP pages (httpapi.py,
metrics.py, control.py), the cache file (persist.py), and the node's interception with its
takeover (netsetup.py, handover.py). Nothing here answers a query.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import gevent
import gevent.event
import gevent.subprocess
from gevent.server import DatagramServer, StreamServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import config as config_module
import routing
from cache import AnswerCache
from config import Config, Endpoint
from configfile import ConfigReloader
from control import CacheControl, loopback_only
from control import cli as control_cli
from handover import InstanceRegistry, NodeInterception, detach_udp, other_sockets, wait_until_read
from httpapi import HttpApi, dns_loop_answers
from logs import configure_logging
from metrics import ProxyCollector, Stats, make_registry
from netsetup import InterceptError, Interceptor, InterceptSpec
from persist import CachePersister
from resolver import Resolver, TaskLimit
from server import AccessList, DnsTcpServer, DnsUdpServer, QueryHandler, bind_loopback_udp, bind_sockets
from upstream import Upstreams, run_prober

CHECK_INTERVAL = 1.0  # seconds between two looks at the interception: drift is repaired within 2 s


class Proxy:
    """The whole running proxy: cache, upstreams, resolver and one UDP and one TCP server per address."""

    def __init__(self, config: Config, log: Any) -> None:
        self.config = config
        self.log = log
        self.cache = AnswerCache(config.cache_size)
        self.stats = Stats()
        upstreams = Upstreams(
            config.upstreams,
            config.upstream_timeout,
            config.deadline,
            config.force_tcp,
            log,
            on_result=self.stats.on_upstream_result,
            on_dropped=self.stats.on_upstream_dropped,
        )
        router = routing.build_router(config, log, default=upstreams)
        self.resolver = Resolver(config, self.cache, router, self.stats, log)
        self.pool = TaskLimit(config.max_concurrent, self.resolver.errors)
        self.handler = QueryHandler(self.resolver, self.pool, log, config.log_queries, AccessList(config.allow))
        self.servers: list[DatagramServer | StreamServer] = []
        # /health asks this one: 127.0.0.1, a port of the kernel's choosing, same server code as the
        # listen addresses, none of which may be reachable (a watchdog teardown removes them).
        self.health_server: DnsUdpServer | None = None
        self.health_endpoint: Endpoint | None = None
        self.background: list[gevent.Greenlet] = []
        self.serving = False
        self.persister: CachePersister | None = None
        if config.cache_file:
            self.persister = CachePersister(config.cache_file, self.cache, config.max_stale, log)
        # The interception is node state, shared with a successor or predecessor during a takeover.
        self.node: NodeInterception | None = None
        self.watch_greenlet: gevent.Greenlet | None = None
        if config.intercept != "none":
            spec = InterceptSpec(
                mode=config.intercept,
                local_ips=config.local_ips,
                port=config.listen[0].port,
                dnat_target=str(config.dnat_target) if config.dnat_target else None,
                health_port=config.http.port if config.http and config.http.host in config.local_ips else None,
            )
            interceptor = Interceptor(spec, log, runner=gevent.subprocess.run)
            self.node = NodeInterception(interceptor, InstanceRegistry(config.state_dir, log), log)
        self.http: HttpApi | None = None
        if config.http is not None:
            self.http = HttpApi(config.http, self.liveness, self.readiness, log, freebind=self.node is not None)
            registry = make_registry(ProxyCollector(self.stats, self.cache, self.upstream_groups, self.persister))
            self.http.add_route("/metrics", lambda environ: ("200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)))
            control = CacheControl(self.cache, time.monotonic, log)
            self.http.add_route("/cache", loopback_only(control.show))
            self.http.add_route("/cache/purge", loopback_only(control.purge))

    def start(self) -> None:
        """Load the cache, bind, serve, then set up interception (NodeLocal DNSCache's order).

        Raises OSError when a socket cannot be bound. An interception that cannot be installed is
        logged (``intercept_failed``), /ready says why, and the install is tried again every
        --sync-interval; pods meanwhile reach kube-dns through kube-proxy, as before the proxy came.
        """
        if self.node is not None:
            self.node.claim()
        if self.persister is not None:
            self.persister.load()  # before the sockets serve: the first queries see the loaded cache
        for endpoint in self.config.listen:
            udp, tcp = bind_sockets(endpoint, freebind=self.node is not None)
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
        health = bind_loopback_udp()
        self.health_endpoint = Endpoint("127.0.0.1", health.getsockname()[1])
        self.health_server = DnsUdpServer(health, self.handler)
        for server in [*self.servers, self.health_server]:
            server.start()
        resolver = self.resolver
        self.background.append(
            gevent.spawn(
                run_prober, lambda: resolver.router.all_upstreams(), lambda: resolver.config.down_probe_interval
            )
        )
        self.background.append(gevent.spawn(self._housekeeping))
        if self.persister is not None:
            self.persister.start(self.config.save_interval)
        interception = None
        if self.node is not None:
            # The HTTP server starts after the addresses: it may listen on the link-local one. A failed
            # install keeps us running, not ready, the node untouched (see NodeInterception.install).
            installed = self.node.install(then=self.http.start if self.http is not None else lambda: None)
            interception = "installed" if installed else "failed"
            self.watch_greenlet = gevent.spawn(self._watch_interception, self.node)
        elif self.http is not None:
            self.http.start()
        self.serving = True
        self.log.info(
            "serving",
            instances_on_node=self.node.instances() if self.node is not None else None,
            interception=interception,
        )

    def upstream_groups(self) -> list[Upstreams]:
        """Every set of upstreams the proxy forwards to (for metrics and the summary)."""
        return self.resolver.router.all_upstreams()

    def reconfigure(self, config: Config) -> None:
        """Swap in a reloaded Config whose restart-only settings are the running ones (configfile.py).

        The cache and the sockets stay; new routes keep the health of unchanged upstreams. Nothing
        here yields, so no query sees half of the change.
        """
        self.resolver.reconfigure(config, routing.build_router(config, self.log, previous=self.resolver.router))
        self.handler.log_queries = config.log_queries
        if config.allow != self.config.allow:
            self.handler.access = AccessList(config.allow)
        self.config = config

    def liveness(self) -> bool:
        """Whether the event loop and the query path answer: a query to our loopback health socket."""
        return self.health_endpoint is not None and dns_loop_answers(self.health_endpoint)

    def readiness(self) -> tuple[bool, str]:
        """Ready once the cache is loaded, the sockets serve and interception (if any) is in place,
        as seen on the node at most CHECK_MAX_AGE (2 s) ago."""
        if not self.serving:
            return False, "starting"
        if self.node is not None:
            if self.node.newer_starting():
                # One port for both during a takeover (SO_REUSEPORT): a probe of the successor's pod
                # may reach us, and the successor is not ready until it serves.
                return False, "successor starting"
            status = self.node.status()
            if not status.in_place:
                return False, status.reason
        return True, "ready"

    def _watch_interception(self, node: NodeInterception) -> None:
        """Every second look for drift and repair it; every --sync-interval a full sync, or a new
        install attempt while the install fails."""
        last_full = time.monotonic()
        while True:
            gevent.sleep(CHECK_INTERVAL)
            full = time.monotonic() - last_full >= self.config.sync_interval
            if full:
                last_full = time.monotonic()
            try:
                if node.installed:
                    node.watch(full, self.liveness)
                elif full:
                    node.install()
            except Exception as exc:  # the boundary: the loop must outlive a bad round (e.g. odd `ip -j` output)
                self.log.error("intercept_watch_failed", error=repr(exc))

    def _housekeeping(self) -> None:
        last_summary = time.monotonic()
        previous = self.stats.as_dict()
        while True:
            gevent.sleep(1.0)
            self.resolver.report_stale_episode()
            interval = self.config.summary_interval
            if interval and time.monotonic() - last_summary >= interval:
                last_summary = time.monotonic()
                previous = self._log_summary(previous)

    def _log_summary(self, previous: dict[str, int]) -> dict[str, int]:
        """One line per interval for cluster logging: what happened since the last one."""
        now = self.stats.as_dict()
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
            autopath_answers=delta["autopath_answers"],
            cache_entries=fresh + stale,
            cache_stale_entries=stale,
            upstreams_down=[str(s.endpoint) for g in self.upstream_groups() for s in g.servers if s.down],
        )
        return now

    def stop(self) -> None:
        """Hand over or fall back, answer every query already received within the grace time, then stop.

        With a successor serving on the node (a takeover) the interception stays, it is the
        successor's now; otherwise the rules go first (fallback to kube-dns). Either way the sockets
        leave the SO_REUSEPORT group before we stop reading them, so no query the kernel gave us is
        dropped, and the last instance out removes the addresses.
        """
        self.serving = False
        handed_over = False
        if self.node is not None:
            if self.watch_greenlet is not None:
                self.watch_greenlet.kill()
            handed_over = self.node.hand_over(self.config.handover_timeout)
        if handed_over and self.http is not None:
            self.http.stop()  # from now on the kubelet's probes reach the successor only
        deadline = time.monotonic() + self.config.grace
        udp_servers = [server for server in self.servers if isinstance(server, DnsUdpServer)]
        for udp in udp_servers:
            try:
                detach_udp(udp.socket)  # new datagrams go to the group's other sockets
            except OSError as exc:
                self.log.warning("udp_detach_failed", error=str(exc))
        for server in self.servers:
            if isinstance(server, DnsTcpServer):
                server.hand_over()  # the listener only; open connections finish their queries
                server.close_idle()
        for udp in udp_servers:
            wait_until_read(udp.socket, deadline)  # what the kernel queued for us before the detach
            udp.stop_accepting()  # the socket stays open to send the answers in flight
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
        for upstreams in self.upstream_groups():
            upstreams.close()
        if self.health_server is not None:
            self.health_server.close()
        if self.persister is not None:
            self.persister.stop()  # the final snapshot, once no query can change the cache any more
        if self.http is not None and not handed_over:
            self.http.stop()
        if self.node is not None:
            self.node.release()
        self.log.info("stopped", handed_over=handed_over, **self.stats.as_dict())


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
    except InterceptError as exc:  # an invalid interception spec; a failed install keeps serving
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
