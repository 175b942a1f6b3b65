"""Cache policy beyond the core: per-zone forwarding, prefetch, prefer-positive and search-path NXDOMAINs."""

from __future__ import annotations

import subprocess
import sys
import time

import dns.edns
import dns.message
import dns.rcode
import pytest
import structlog

import config
import routing
import wire
from conftest import REPO_ROOT, query
from servers import FakeUpstream, KnotServer

FAST = ("--upstream-timeout", "0.5", "--deadline", "1.0")


def addresses(reply) -> list[str]:
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


def is_stale(reply) -> bool:
    return any(o.otype == dns.edns.OptionType.EDE and o.code == 3 for o in reply.options)


def key_of(qname: str) -> bytes:
    return wire.parse_query(dns.message.make_query(qname, "A").to_wire()).key


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def counters_at_stop(proxy) -> dict:
    proxy.stop()
    return next(e for e in proxy.logs() if e.get("event") == "stopped")


class TestForwardSyntax:
    """--forward ZONE=HOST[:PORT][,HOST...] [force_tcp] [min_ttl=S] [max_ttl=S] [max_negative_ttl=S]."""

    @pytest.mark.parametrize(
        ("text", "zone", "servers", "options"),
        [
            ("cluster.local=10.96.0.10", "cluster.local.", ["10.96.0.10:53"], {}),
            ("Cluster.Local.=10.96.0.10:5353", "cluster.local.", ["10.96.0.10:5353"], {}),
            ("in-addr.arpa=10.96.0.10,10.96.0.11", "in-addr.arpa.", ["10.96.0.10:53", "10.96.0.11:53"], {}),
            ("ip6.arpa=[fd00::10]:53", "ip6.arpa.", ["[fd00::10]:53"], {}),
            (".=127.0.0.1", ".", ["127.0.0.1:53"], {}),
            (
                "cluster.local=10.96.0.10 force_tcp max_ttl=30 max-negative-ttl=5 min_ttl=2",
                "cluster.local.",
                ["10.96.0.10:53"],
                {"force_tcp": True, "max_ttl": 30, "max_negative_ttl": 5, "min_ttl": 2},
            ),
        ],
    )
    def test_valid(self, text, zone, servers, options):
        """A valid entry gives its lower-cased absolute zone, its servers and its options."""
        forward = config.parse_forward(text)
        assert forward.zone == zone
        assert [str(e) for e in forward.upstreams] == servers
        for name, value in options.items():
            assert getattr(forward, name) == value

    @pytest.mark.parametrize(
        "text",
        [
            "cluster.local",
            "=10.96.0.10",
            "cluster.local=",
            "cluster.local=kube-dns",
            "cluster.local=10.96.0.10 max_ttl=-1",
            "cluster.local=10.96.0.10 bogus=1",
            "bad..zone=10.96.0.10",
            "ünïcode=10.96.0.10",
        ],
    )
    def test_invalid(self, text):
        """A malformed entry is a one-line ConfigError naming the flag."""
        with pytest.raises(config.ConfigError, match=r"^--forward '"):
            config.build_config(["--upstream", "127.0.0.1:5300", "--forward", text], environ={})

    def test_environment_entries_separated_by_semicolons(self):
        """KUBE_DNS_PROXY_FORWARD holds several entries separated by ';', each with its options."""
        environ = {"KUBE_DNS_PROXY_FORWARD": "cluster.local=10.96.0.10 force_tcp; ip6.arpa=10.96.0.10,10.96.0.11"}
        built = config.build_config(["--upstream", "127.0.0.1:5300"], environ=environ)
        assert [(f.zone, f.force_tcp, len(f.upstreams)) for f in built.forward] == [
            ("cluster.local.", True, 1),
            ("ip6.arpa.", False, 2),
        ]

    @pytest.mark.e2e  # runs proxy.py
    @pytest.mark.parametrize("server", ["127.0.0.1:5399", "169.254.20.10"])
    def test_zone_forwarding_to_ourselves_is_refused(self, server):
        """A zone whose server is one of our listen or local addresses is a forwarding loop: exit 2, one line."""
        result = subprocess.run(
            [
                sys.executable,
                "proxy.py",
                "--listen",
                "127.0.0.1:5399",
                "--upstream",
                "127.0.0.1:5300",
                "--local-ip",
                "169.254.20.10",
                "--forward",
                f"cluster.local={server}",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "forwarding loop" in result.stderr

    def test_same_zone_twice_is_refused(self):
        """Two entries for one zone are ambiguous: refused."""
        with pytest.raises(config.ConfigError, match="given twice"):
            config.build_config(
                ["--upstream", "127.0.0.1:5300", "--forward", "a.example=10.0.0.1", "--forward", "A.example.=10.0.0.2"],
                environ={},
            )


class TestRouter:
    """The route of a name is the longest zone it is in, matched on label boundaries."""

    @pytest.fixture
    def router(self) -> routing.Router:
        built = config.build_config(
            [
                "--upstream",
                "127.0.0.1:5300",
                "--forward",
                "cluster.local=127.0.0.2",
                "--forward",
                "svc.cluster.local=127.0.0.3 max_ttl=30",
                "--forward",
                "in-addr.arpa=127.0.0.2",
            ],
            environ={},
        )
        return routing.build_router(built, structlog.get_logger())

    @pytest.mark.parametrize(
        ("qname", "zone"),
        [
            ("web.default.svc.cluster.local", "svc.cluster.local."),
            ("WEB.Default.SVC.Cluster.Local", "svc.cluster.local."),
            ("svc.cluster.local", "svc.cluster.local."),
            ("pod.cluster.local", "cluster.local."),
            ("cluster.local", "cluster.local."),
            ("xcluster.local", "."),
            ("local", "."),
            ("example.com", "."),
            ("1.0.96.10.in-addr.arpa", "in-addr.arpa."),
            (".", "."),
        ],
    )
    def test_longest_zone_wins(self, router, qname, zone):
        """Each name goes to the longest zone it is in, or to the default route."""
        assert router.route_for(key_of(qname)).zone == zone

    def test_zones_with_the_same_servers_share_one_health(self, router):
        """cluster.local and in-addr.arpa name the same server, so they share its Upstreams."""
        cluster = router.route_for(key_of("a.cluster.local"))
        assert cluster.upstreams is router.route_for(key_of("1.in-addr.arpa")).upstreams
        assert len(router.all_upstreams()) == 3

    def test_rebuild_keeps_the_health_of_unchanged_servers(self, router):
        """A reload keeps the Upstreams (and health) of unchanged servers, with the new timeouts, and makes new ones."""
        cluster = router.route_for(key_of("a.cluster.local")).upstreams
        cluster.servers[0].down = True
        changed = config.build_config(
            [
                "--upstream",
                "127.0.0.1:5300",
                "--forward",
                "cluster.local=127.0.0.2",
                "--forward",
                "svc.cluster.local=127.0.0.4",
                "--upstream-timeout",
                "0.5",
            ],
            environ={},
        )
        rebuilt = routing.build_router(changed, structlog.get_logger(), previous=router)
        kept = rebuilt.route_for(key_of("a.cluster.local")).upstreams
        assert kept is cluster and kept.servers[0].down and kept.try_timeout == 0.5
        assert (
            rebuilt.route_for(key_of("a.svc.cluster.local")).upstreams
            is not router.route_for(key_of("a.svc.cluster.local")).upstreams
        )
        assert rebuilt.route_for(key_of("1.in-addr.arpa")).zone == "."

    def test_zone_ttl_bounds_fall_back_to_the_global_ones(self, router):
        """A zone's max_ttl is its own; the bounds it does not set are the global ones."""
        route = router.route_for(key_of("web.default.svc.cluster.local"))
        assert (route.policy.min_ttl, route.policy.max_ttl, route.policy.max_negative_ttl) == (0, 30, 1800)
        assert router.default.policy.max_ttl == 3600


class TestZoneRouting:
    """Queries reach the servers of their zone, with the zone's transport and TTL bounds."""

    def test_each_zone_goes_to_its_servers(self, fake_upstream, proxy_factory):
        """Cluster names, service names and other names each reach only their own upstream."""
        with FakeUpstream() as cluster, FakeUpstream() as services:
            cluster.default_address = "192.0.2.2"
            services.default_address = "192.0.2.3"
            proxy = proxy_factory(
                "--upstream",
                fake_upstream.address,
                "--forward",
                f"cluster.local={cluster.address}",
                "--forward",
                f"svc.cluster.local={services.address}",
            )
            assert addresses(query(proxy.address, "web.default.svc.cluster.local")) == ["192.0.2.3"]
            assert addresses(query(proxy.address, "10-0-0-1.default.pod.cluster.local")) == ["192.0.2.2"]
            assert addresses(query(proxy.address, "example.com")) == ["192.0.2.1"]
            assert addresses(query(proxy.address, "xcluster.local")) == ["192.0.2.1"]
            assert (services.count(), cluster.count(), fake_upstream.count()) == (1, 1, 2)

    def test_zone_ttl_caps_hold(self, fake_upstream, proxy_factory):
        """A zone's max_ttl and max_negative_ttl cap its answers; other names keep the global caps."""
        fake_upstream.ttl = 300
        with FakeUpstream(ttl=300, neg_ttl=300) as cluster:
            proxy = proxy_factory(
                "--upstream",
                fake_upstream.address,
                "--forward",
                f"cluster.local={cluster.address} max_ttl=5 max_negative_ttl=3",
            )
            assert query(proxy.address, "web.default.svc.cluster.local").answer[0].ttl == 5
            assert query(proxy.address, "example.com").answer[0].ttl == 300
            cluster.mode = "nxdomain"
            denial = query(proxy.address, "gone.default.svc.cluster.local")
            assert denial.rcode() == dns.rcode.NXDOMAIN
            assert denial.authority[0].ttl == 3

    def test_zone_force_tcp(self, fake_upstream, proxy_factory):
        """A zone with force_tcp is asked over TCP while the default route keeps UDP."""
        with FakeUpstream() as cluster:
            proxy = proxy_factory(
                "--upstream", fake_upstream.address, "--forward", f"cluster.local={cluster.address} force_tcp"
            )
            query(proxy.address, "web.default.svc.cluster.local")
            query(proxy.address, "example.com")
            assert (cluster.count(transport="tcp"), cluster.count(transport="udp")) == (1, 0)
            assert (fake_upstream.count(transport="udp"), fake_upstream.count(transport="tcp")) == (1, 0)

    def test_zone_down_does_not_fail_other_names(self, fake_upstream, proxy_factory):
        """A zone whose servers are down gets SERVFAIL while names of the default route still resolve."""
        with FakeUpstream(mode="down") as cluster:
            proxy = proxy_factory(
                "--upstream", fake_upstream.address, "--forward", f"cluster.local={cluster.address}", *FAST
            )
            assert query(proxy.address, "web.default.svc.cluster.local").rcode() == dns.rcode.SERVFAIL
            assert query(proxy.address, "example.com").rcode() == dns.rcode.NOERROR


class TestPrefetch:
    """--prefetch N refreshes popular entries before they expire."""

    QNAME = "popular.default.svc.cluster.local"

    def _ask_until_prefetch_window(self, proxy) -> None:
        for _ in range(3):  # a miss, then two hits: asked twice during the entry's life
            reply = query(proxy.address, self.QNAME, edns=1232)
            assert reply.rcode() == dns.rcode.NOERROR and not is_stale(reply)
        time.sleep(2.3)  # TTL 4: now in its last 50 %
        reply = query(proxy.address, self.QNAME, edns=1232)
        assert reply.answer and not is_stale(reply)

    def test_popular_name_refreshed_before_it_expires(self, fake_upstream, proxy_factory):
        """A name asked twice is refreshed in its last 50 % of TTL; after the old expiry it is still a fresh hit."""
        fake_upstream.ttl = 4
        proxy = proxy_factory("--upstream", fake_upstream.address, "--prefetch", "2", "--prefetch-percent", "50", *FAST)
        self._ask_until_prefetch_window(proxy)
        assert wait_for(lambda: fake_upstream.count(qname=self.QNAME) == 2, timeout=1.0)
        time.sleep(2.2)  # past the first answer's expiry (4 s after the miss)
        reply = query(proxy.address, self.QNAME, edns=1232)
        assert reply.rcode() == dns.rcode.NOERROR and not is_stale(reply)
        assert 1 <= reply.answer[0].ttl <= 3
        assert fake_upstream.count(qname=self.QNAME) == 2  # answered from the prefetched entry
        counters = counters_at_stop(proxy)
        assert counters["prefetches"] == 1 and counters["misses"] == 1

    def test_no_prefetch_when_off(self, fake_upstream, proxy_factory):
        """Without --prefetch the same name is not asked again until it has expired."""
        fake_upstream.ttl = 4
        proxy = proxy_factory("--upstream", fake_upstream.address, *FAST)
        self._ask_until_prefetch_window(proxy)
        time.sleep(0.5)
        assert fake_upstream.count(qname=self.QNAME) == 1

    def test_not_popular_enough_no_prefetch(self, fake_upstream, proxy_factory):
        """An entry asked fewer times than N is left to expire."""
        fake_upstream.ttl = 4
        proxy = proxy_factory(
            "--upstream", fake_upstream.address, "--prefetch", "10", "--prefetch-percent", "50", *FAST
        )
        self._ask_until_prefetch_window(proxy)
        time.sleep(0.5)
        assert fake_upstream.count(qname=self.QNAME) == 1

    def test_failed_prefetch_leaves_the_entry(self, fake_upstream, proxy_factory):
        """A prefetch the upstream does not answer leaves the entry as it was, still served fresh."""
        fake_upstream.ttl = 4
        proxy = proxy_factory("--upstream", fake_upstream.address, "--prefetch", "2", "--prefetch-percent", "50", *FAST)
        for _ in range(3):
            query(proxy.address, self.QNAME)
        fake_upstream.mode = "servfail"
        time.sleep(2.3)
        first = query(proxy.address, self.QNAME, edns=1232)
        assert wait_for(lambda: fake_upstream.count(qname=self.QNAME) == 2, timeout=1.0)
        again = query(proxy.address, self.QNAME, edns=1232)
        assert addresses(again) == ["192.0.2.1"] and not is_stale(again)
        assert again.answer[0].ttl <= first.answer[0].ttl <= 2


class TestPreferPositive:
    """--prefer-positive: during upstream trouble a negative answer does not replace a positive one."""

    QNAME = "api.default.svc.cluster.local"
    ARGS = ("--failure-recheck", "1", "--stale-answer-timeout", "0.5", *FAST)

    def _outage_then_nxdomain(self, fake_upstream, proxy) -> list:
        """Cache the name, take the upstream down until it is marked down, then make it deny the name."""
        assert addresses(query(proxy.address, self.QNAME)) == ["192.0.2.1"]
        fake_upstream.mode = "down"
        time.sleep(1.2)  # the entry is stale; its refresh fails and marks the upstream down
        assert addresses(query(proxy.address, self.QNAME)) == ["192.0.2.1"]
        fake_upstream.mode = "nxdomain"
        denied_before = fake_upstream.count(qname=self.QNAME)
        replies = []
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            replies.append(query(proxy.address, self.QNAME))
            time.sleep(0.25)
        assert fake_upstream.count(qname=self.QNAME) > denied_before  # the upstream did deny it
        return replies

    def test_positive_answer_kept_while_upstream_recovers(self, fake_upstream, proxy_factory):
        """With --prefer-positive, NXDOMAIN from an upstream that just came back never replaces the held answer."""
        fake_upstream.ttl = 1
        proxy = proxy_factory("--upstream", fake_upstream.address, "--prefer-positive", *self.ARGS)
        replies = self._outage_then_nxdomain(fake_upstream, proxy)
        assert all(r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.1"] for r in replies)
        assert counters_at_stop(proxy)["negative_held"] >= 1

    def test_negative_answer_replaces_when_off(self, fake_upstream, proxy_factory):
        """Without --prefer-positive, the NXDOMAIN of the recovered upstream is what clients get."""
        fake_upstream.ttl = 1
        proxy = proxy_factory("--upstream", fake_upstream.address, *self.ARGS)
        replies = self._outage_then_nxdomain(fake_upstream, proxy)
        assert replies[-1].rcode() == dns.rcode.NXDOMAIN

    def test_negative_answer_replaces_after_the_grace(self, fake_upstream, proxy_factory):
        """Once --prefer-positive-grace has passed since the upstream came back, NXDOMAIN is accepted."""
        fake_upstream.ttl = 1
        proxy = proxy_factory(
            "--upstream", fake_upstream.address, "--prefer-positive", "--prefer-positive-grace", "1", *self.ARGS
        )
        replies = self._outage_then_nxdomain(fake_upstream, proxy)
        assert replies[0].rcode() == dns.rcode.NOERROR
        assert replies[-1].rcode() == dns.rcode.NXDOMAIN

    def test_nodata_held_like_nxdomain(self, fake_upstream, proxy_factory):
        """An empty NOERROR (NODATA) from a recovering upstream is held back too."""
        fake_upstream.ttl = 1
        proxy = proxy_factory("--upstream", fake_upstream.address, "--prefer-positive", *self.ARGS)
        assert addresses(query(proxy.address, self.QNAME)) == ["192.0.2.1"]
        fake_upstream.mode = "down"
        time.sleep(1.2)
        query(proxy.address, self.QNAME)
        fake_upstream.mode = "nodata"
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert addresses(query(proxy.address, self.QNAME)) == ["192.0.2.1"]
            time.sleep(0.25)
        assert counters_at_stop(proxy)["negative_held"] >= 1


# glibc in a pod of namespace "default": /etc/resolv.conf as the kubelet writes it.
SEARCH = ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")


def pod_lookup(address: str, name: str) -> list[int]:
    """Resolve a relative name as glibc does with ndots:5: each search suffix, then the name as is, A and AAAA."""
    candidates = [f"{name}.{suffix}." for suffix in SEARCH] + [f"{name}."]
    return [query(address, candidate, qtype).rcode() for candidate in candidates for qtype in ("A", "AAAA")]


class TestSearchPath:
    """ndots:5 search-path NXDOMAINs are answered from the negative cache after the first lookup."""

    def test_repeated_external_lookup_reaches_no_upstream(self, knot: KnotServer, fake_upstream, proxy_factory):
        """The first lookup of an external name costs 8 upstream queries, the second one none."""
        proxy = proxy_factory("--upstream", fake_upstream.address, "--forward", f"cluster.local={knot.address}")
        knot_before = knot.query_count()
        first = pod_lookup(proxy.address, "www.example.com")
        knot_after_first = knot.query_count()
        assert first == [dns.rcode.NXDOMAIN] * 6 + [dns.rcode.NOERROR] * 2
        assert (knot_after_first - knot_before, fake_upstream.count()) == (6, 2)
        second = pod_lookup(proxy.address, "www.example.com")  # within Knot's 5 s negative TTL
        assert second == first
        assert (knot.query_count(), fake_upstream.count()) == (knot_after_first, 2)
