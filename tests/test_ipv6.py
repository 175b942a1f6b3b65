"""IPv6: the proxy serves on [::1] and forwards to upstreams on ::1, UDP and TCP, with its access list."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import structlog

import netsetup
import test_netsetup as tn
from conftest import dig, query
from servers import FakeUpstream, KnotServer, free_port

TRANSPORTS = [False, True]
TRANSPORT_IDS = ["udp", "tcp"]


@pytest.fixture
def upstream6() -> Iterator[FakeUpstream]:
    """A FakeUpstream on ::1 in "answer" mode."""
    with FakeUpstream(host="::1") as upstream:
        yield upstream


@pytest.mark.e2e
class TestServeOnIPv6Loopback:
    """A proxy on [::1]:port forwarding to [::1]:port upstreams."""

    @pytest.mark.parametrize("tcp", TRANSPORTS, ids=TRANSPORT_IDS)
    def test_answers_over_ipv6_from_ipv6_upstream(self, upstream6: FakeUpstream, proxy_factory, tcp: bool) -> None:
        """A query to [::1] is forwarded to the ::1 upstream over the client's transport and answered."""
        port = free_port()
        proxy_factory("--upstream", upstream6.address, "--listen", f"[::1]:{port}")
        reply = query(f"[::1]:{port}", "svc.default.svc.cluster.local", tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.answer
        assert upstream6.count(qname="svc.default.svc.cluster.local.") == 1

    def test_second_query_served_from_cache(self, upstream6: FakeUpstream, proxy_factory) -> None:
        """A repeated query over IPv6 is answered from the cache without asking the upstream again."""
        port = free_port()
        proxy_factory("--upstream", upstream6.address, "--listen", f"[::1]:{port}")
        for tcp in (False, True):
            assert query(f"[::1]:{port}", "cached.default.svc.cluster.local", tcp=tcp).rcode() == dns.rcode.NOERROR
        assert upstream6.count(qname="cached.default.svc.cluster.local.") == 1

    @pytest.mark.parametrize("tcp", TRANSPORTS, ids=TRANSPORT_IDS)
    def test_dig_through_knot_on_ipv6(self, tmp_path: Path, proxy_factory, tcp: bool) -> None:
        """dig over IPv6 gets Knot's record on ::1 through the proxy on [::1]."""
        with KnotServer(tmp_path / "knot6", host="::1") as knot:
            port = free_port()
            proxy_factory("--upstream", knot.address, "--listen", f"[::1]:{port}")
            args = ["@::1", "-p", str(port), "+short", "kube-dns.kube-system.svc.cluster.local", "A"]
            out = dig(*args, *(["+tcp"] if tcp else []))
        assert out.strip() == "10.96.0.10"

    def test_ipv6_client_refused_when_not_allowed(self, upstream6: FakeUpstream, proxy_factory) -> None:
        """With --allow naming only IPv4 loopback, a client on ::1 gets REFUSED over UDP and TCP."""
        port = free_port()
        proxy_factory("--upstream", upstream6.address, "--listen", f"[::1]:{port}", "--allow", "127.0.0.0/8")
        for tcp in (False, True):
            assert query(f"[::1]:{port}", "svc.default.svc.cluster.local", tcp=tcp).rcode() == dns.rcode.REFUSED
        assert upstream6.count() == 0

    def test_ipv6_client_answered_when_its_range_allowed(self, upstream6: FakeUpstream, proxy_factory) -> None:
        """--allow ::1/128 lets the ::1 client in while an IPv4-only list would refuse it."""
        port = free_port()
        proxy_factory("--upstream", upstream6.address, "--listen", f"[::1]:{port}", "--allow", "::1/128")
        assert query(f"[::1]:{port}", "svc.default.svc.cluster.local").rcode() == dns.rcode.NOERROR

    def test_ipv6_listener_does_not_take_ipv4(self, upstream6: FakeUpstream, proxy_factory) -> None:
        """A [::] listener is IPv6 only (IPV6_V6ONLY): another proxy may own the same IPv4 port."""
        port = free_port()
        proxy_factory("--upstream", upstream6.address, "--listen", f"[::]:{port}")
        message = dns.message.make_query("svc.default.svc.cluster.local", "A")
        with pytest.raises((dns.exception.Timeout, ConnectionRefusedError)):
            dns.query.udp(message, "127.0.0.1", port=port, timeout=0.5)
        assert query(f"[::1]:{port}", "svc.default.svc.cluster.local").rcode() == dns.rcode.NOERROR


LOCAL6 = "fd00::10"
CLUSTER6 = "fd00:10:96::a"
LOCAL4 = "169.254.20.10"
CLUSTER4 = "169.254.96.10"


class TestIPv6InterceptSpec:
    """InterceptSpec with IPv6 and dual-stack local IPs (no root needed)."""

    def test_ipv6_nodelocal_rules_are_ip6tables_rules_on_128s(self) -> None:
        """An IPv6 local IP gets node-cache's 10 rules in the IPv6 tables, matching its /128."""
        spec = netsetup.InterceptSpec(mode="nodelocal", local_ips=(LOCAL6, CLUSTER6))
        rules = spec.rules()
        assert len(rules) == 20
        assert {rule.family for rule in rules} == {6}
        assert {rule.match[1] for rule in rules} == {f"{LOCAL6}/128", f"{CLUSTER6}/128"}

    def test_dual_stack_nodelocal_has_both_families(self) -> None:
        """v4 and v6 local IPs together give the same rule set in each family."""
        spec = netsetup.InterceptSpec(mode="nodelocal", local_ips=(LOCAL4, CLUSTER4, LOCAL6, CLUSTER6))
        rules = spec.rules()
        assert sum(rule.family == 4 for rule in rules) == sum(rule.family == 6 for rule in rules) == 20
        assert spec.wanted_addresses() == (LOCAL4, CLUSTER4, LOCAL6, CLUSTER6)

    def test_ipv6_dnat_targets_the_first_ipv6_local_ip(self) -> None:
        """dnat mode redirects the IPv6 ClusterIP to [first IPv6 local IP]:port in the IPv6 nat table."""
        spec = netsetup.InterceptSpec(mode="dnat", local_ips=(LOCAL6, CLUSTER6))
        assert {rule.target for rule in spec.rules()} == {("DNAT", "--to-destination", f"[{LOCAL6}]:53")}
        assert {rule.family for rule in spec.rules()} == {6}
        assert spec.wanted_addresses() == (LOCAL6,)

    def test_dual_stack_dnat_targets_per_family(self) -> None:
        """Each family's ClusterIPs go to that family's local IP; no rule crosses families."""
        spec = netsetup.InterceptSpec(mode="dnat", local_ips=(LOCAL4, CLUSTER4, LOCAL6, CLUSTER6))
        pairs = {(rule.match[1], rule.target[-1]) for rule in spec.rules()}
        assert pairs == {(f"{CLUSTER4}/32", f"{LOCAL4}:53"), (f"{CLUSTER6}/128", f"[{LOCAL6}]:53")}
        assert spec.cluster_ips == (CLUSTER4, CLUSTER6)

    def test_explicit_ipv6_dnat_target_with_brackets(self) -> None:
        """dnat_target [addr]:port is parsed for the IPv6 family."""
        spec = netsetup.InterceptSpec(mode="dnat", local_ips=(LOCAL6, CLUSTER6), dnat_target=f"[{LOCAL6}]:5353")
        assert spec.target_for(6) == (LOCAL6, 5353)

    def test_ipv6_loopback_dnat_target_rejected(self) -> None:
        """A ::1 dnat target is refused with the reason: IPv6 has no route_localnet."""
        with pytest.raises(netsetup.InterceptError, match="route_localnet"):
            netsetup.InterceptSpec(mode="dnat", local_ips=(LOCAL6, CLUSTER6), dnat_target="[::1]:53")

    def test_dnat_needs_a_cluster_ip_in_each_family(self) -> None:
        """A lone IPv6 address next to IPv4 ones is neither a target nor a ClusterIP: refused."""
        with pytest.raises(netsetup.InterceptError, match="IPv6 ClusterIP"):
            netsetup.InterceptSpec(mode="dnat", local_ips=(LOCAL4, CLUSTER4, LOCAL6))

    def test_ipv6_address_metric_is_stable_and_per_tag(self) -> None:
        """The metric that marks our IPv6 addresses depends on the tag only, and fits a u32."""
        assert netsetup.address_metric("kube-dns-proxy") == netsetup.address_metric("kube-dns-proxy")
        assert netsetup.address_metric("a") != netsetup.address_metric("b")
        assert 0 < netsetup.address_metric("kube-dns-proxy") < 2**32


# -- the IPv6 namespace lab: pod -> node -> kube-dns over IPv6, fd00::/8 addresses only -------------

POD6 = "fd00:100::2"
NODE_POD_SIDE6 = "fd00:100::1"
NODE_UP_SIDE6 = "fd00:101::1"
KUBE_DNS_ENDPOINT6 = "fd00:101::2"
UPSTREAM_ENDPOINT6 = "fd00:101::3"
CLUSTER_IP6 = "fd00:96::a"  # stands in for the IPv6 kube-dns ClusterIP (e.g. fd00:10:96::a)
UPSTREAM_SERVICE_IP6 = "fd00:96::b"
# The node-local IPv6 address: the operator's choice (no well-known one exists, unlike 169.254.20.10).
LOCAL_IP6 = "fd00::10"


def endpoint(ip: str, port: int = 53) -> str:
    """Return ``ip:port`` for IPv4, ``[ip]:port`` for IPv6."""
    return f"{ip}:{port}" if netsetup.family_of(ip) == 4 else f"[{ip}]:{port}"


class Lab6(tn.Lab):
    """The IPv4 lab's three namespaces wired over IPv6; answers are A records naming who answered."""

    # The proxy's --local-ip list on this node: its own address first, then the ClusterIP, per family.
    local_ips: tuple[str, ...] = (LOCAL_IP6, CLUSTER_IP6)
    pod_nameservers: tuple[str, ...] = (CLUSTER_IP6,)

    def setup(self) -> None:
        """Create namespaces, IPv6 links and routes, the pod's IPv6 resolv.conf and a kube-proxy stand-in."""
        for ns in (self.pod, self.node, self.up):
            tn._run(["ip", "netns", "add", ns])
            self.created.append(ns)
            tn._run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.write_resolv_conf()
        for args in (
            ["-n", self.node, "link", "add", "n0", "type", "veth", "peer", "name", "p0", "netns", self.pod],
            ["-n", self.node, "link", "add", "n1", "type", "veth", "peer", "name", "u0", "netns", self.up],
        ):
            tn._run(["ip", *args])
        self.add_ipv6()

    def add_ipv6(self) -> None:
        """Put the IPv6 addresses and routes on the lab's links, kube-proxy's IPv6 rules, and kube-dns on IPv6."""
        commands = [
            # nodad: usable at once instead of "tentative" for a second.
            ["-n", self.node, "-6", "addr", "add", f"{NODE_POD_SIDE6}/64", "dev", "n0", "nodad"],
            ["-n", self.pod, "-6", "addr", "add", f"{POD6}/64", "dev", "p0", "nodad"],
            ["-n", self.node, "-6", "addr", "add", f"{NODE_UP_SIDE6}/64", "dev", "n1", "nodad"],
            ["-n", self.up, "-6", "addr", "add", f"{KUBE_DNS_ENDPOINT6}/64", "dev", "u0", "nodad"],
            ["-n", self.up, "-6", "addr", "add", f"{UPSTREAM_ENDPOINT6}/64", "dev", "u0", "nodad"],
            ["-n", self.node, "link", "set", "n0", "up"],
            ["-n", self.node, "link", "set", "n1", "up"],
            ["-n", self.pod, "link", "set", "p0", "up"],
            ["-n", self.up, "link", "set", "u0", "up"],
            ["-n", self.pod, "-6", "route", "add", "fd00:96::/64", "via", NODE_POD_SIDE6],
            ["-n", self.pod, "-6", "route", "add", f"{LOCAL_IP6}/128", "via", NODE_POD_SIDE6],
            ["-n", self.node, "-6", "route", "add", "fd00:96::/64", "via", KUBE_DNS_ENDPOINT6],
            ["-n", self.up, "-6", "route", "add", "fd00:100::/64", "via", NODE_UP_SIDE6],
        ]
        for args in commands:
            tn._run(["ip", *args])
        self.sh(self.node, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        self.sh(self.node, "ip6tables", "-w", "5", "-t", "nat", "-N", "KUBE-SERVICES")
        for service_ip, endpoint in ((CLUSTER_IP6, KUBE_DNS_ENDPOINT6), (UPSTREAM_SERVICE_IP6, UPSTREAM_ENDPOINT6)):
            for proto in ("udp", "tcp"):
                self.sh(
                    self.node,
                    *("ip6tables", "-w", "5", "-t", "nat", "-A", "KUBE-SERVICES", "-d", f"{service_ip}/128"),
                    *("-p", proto, "-m", proto, "--dport", "53", "-j", "DNAT", "--to-destination", f"[{endpoint}]:53"),
                )
        for chain in ("PREROUTING", "OUTPUT"):
            self.sh(self.node, "ip6tables", "-w", "5", "-t", "nat", "-I", chain, "1", "-j", "KUBE-SERVICES")
        self.respond(
            self.up,
            "kube-dns6",
            f"[{KUBE_DNS_ENDPOINT6}]:53={tn.ANSWER_KUBE_DNS}",
            f"[{UPSTREAM_ENDPOINT6}]:53={tn.ANSWER_VIA_PROXY}",
        )
        # Fresh veths resolve their IPv6 neighbours on first use: a test's first lookup must not be
        # the one that waits for it (or loses its datagram).
        tn.wait_for(
            lambda: self.dig(CLUSTER_IP6, "lab-ready.example") == tn.ANSWER_KUBE_DNS,
            10,
            "the pod reaches kube-dns through the IPv6 ClusterIP",
        )

    def write_resolv_conf(self, tcp: bool = False, pod_nameservers: tuple[str, ...] | None = None) -> None:
        """Write every namespace's resolv.conf: the pod's names ``pod_nameservers`` (default: the lab's ClusterIPs).

        The node and the upstream namespace get the IPv6 upstream Service; ``tcp`` adds glibc's use-vc.
        """
        for ns, nameservers in (
            (self.pod, pod_nameservers or self.pod_nameservers),
            (self.node, (UPSTREAM_SERVICE_IP6,)),
            (self.up, (UPSTREAM_SERVICE_IP6,)),
        ):
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            options = "timeout:1 attempts:2" + (" use-vc" if tcp else "")
            lines = "".join(f"nameserver {nameserver}\n" for nameserver in nameservers)
            (etc / "resolv.conf").write_text(f"{lines}options {options}\n")

    def getent(self, qname: str) -> str:
        """Return the first address glibc's getaddrinfo (``getent ahosts``) finds in the pod over its IPv6 nameserver.

        The pod has no IPv4 address, so glibc prints the A answer v4-mapped (AI_V4MAPPED): ::ffff:169.254.0.x,
        returned here without the prefix.  (``ahostsv4`` finds nothing: AI_ADDRCONFIG, no IPv4 configured.)
        """
        proc = self.sh(self.pod, "getent", "ahosts", qname, check=False)
        if not proc.stdout.split():
            return f"error:rc={proc.returncode}"
        return proc.stdout.split()[0].removeprefix("::ffff:")

    def tagged(self) -> list[str]:
        """Return every IPv4 or IPv6 rule and address of ours in the node namespace."""
        found = []
        for save in ("iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"):
            for line in self.sh(self.node, save).stdout.splitlines():
                if f"--comment {tn.TAG}" in line:
                    found.append(f"{save}: {line}")
        metric = netsetup.address_metric(tn.TAG)
        for link in json.loads(self.sh(self.node, "ip", "-j", "-d", "addr", "show").stdout):
            if link.get("ifalias") == tn.TAG:
                found.append(f"interface {link['ifname']}")
            for info in link.get("addr_info", []):
                if info.get("metric") == metric or info.get("local") in (LOCAL_IP6, CLUSTER_IP6):
                    found.append(f"address {info['local']} on {link['ifname']}")
        return found

    def count_rules6(self) -> int:
        """Return how many IPv6 rules with our tag the node has (system ip6tables)."""
        out = self.sh(self.node, "ip6tables-save").stdout
        return sum(f"--comment {tn.TAG}" in line for line in out.splitlines())


@pytest.fixture
def lab6(tmp_path: Path) -> Iterator[Lab6]:
    """Provide a fresh IPv6 pod/node/upstream lab, deleted afterwards even on failure."""
    the_lab = Lab6(tmp_path)
    try:
        the_lab.setup()
        yield the_lab
    finally:
        the_lab.close()


def lookup6(lab: Lab6, transport: str, qname: str, cluster_ip: str = CLUSTER_IP6) -> str:
    """Resolve qname from the pod through one ClusterIP: dig over UDP or TCP, or glibc over UDP or TCP.

    For glibc the pod's resolv.conf names that ClusterIP alone, so the answer came through it.
    """
    if transport.startswith("glibc"):
        lab.write_resolv_conf(tcp=transport == "glibc-tcp", pod_nameservers=(cluster_ip,))
        return lab.getent(qname)
    return lab.dig(cluster_ip, qname, tcp=transport == "tcp", timeout=3)


TRANSPORTS6 = ["udp", "tcp", "glibc-udp", "glibc-tcp"]


def spec6(mode: str, local_ips: tuple[str, ...] = Lab6.local_ips) -> netsetup.InterceptSpec:
    """Return the InterceptSpec of proxy.py --intercept MODE with these --local-ip addresses."""
    health_port = tn.HEALTH_PORT if mode == "nodelocal" else None
    return netsetup.InterceptSpec(mode=mode, local_ips=local_ips, health_port=health_port)


def interceptor6(lab: Lab6, mode: str) -> netsetup.Interceptor:
    """Return an Interceptor for the lab's local IPs whose commands run in its node namespace."""
    spec = spec6(mode, lab.local_ips)
    return netsetup.Interceptor(spec, structlog.get_logger().bind(test_lab=lab.node), runner=lab.runner(lab.node))


def intercept6(lab: Lab6, mode: str) -> netsetup.Interceptor:
    """Start the stand-in where the mode's proxy listens, then leftovers, addresses, rules."""
    listen = spec6(mode, lab.local_ips).wanted_addresses()  # nodelocal: every local IP; dnat: each family's target
    lab.respond(lab.node, "stand-in", *(f"{endpoint(ip)}={tn.ANSWER_LOCAL}" for ip in listen))
    interceptor = interceptor6(lab, mode)
    interceptor.remove_leftovers()
    interceptor.add_addresses()
    interceptor.install_rules()
    return interceptor


MODES = ["nodelocal", "dnat"]


@pytest.mark.timeout(120)
class TestIPv6Interception:
    """netsetup.Interceptor with IPv6 addresses in the namespace lab."""

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("transport", TRANSPORTS6)
    def test_cluster_ip_answered_locally(self, lab6: Lab6, mode: str, transport: str) -> None:
        """The pod's queries to the IPv6 ClusterIP are answered on the node, then by kube-dns after teardown."""
        assert lookup6(lab6, transport, "before.example") == tn.ANSWER_KUBE_DNS
        interceptor = intercept6(lab6, mode)
        assert lookup6(lab6, transport, "during.example") == tn.ANSWER_LOCAL
        interceptor.teardown()
        assert lookup6(lab6, transport, "after.example") == tn.ANSWER_KUBE_DNS

    @pytest.mark.parametrize("mode", MODES)
    def test_nothing_tagged_left_after_teardown(self, lab6: Lab6, mode: str) -> None:
        """Teardown removes every IPv6 rule and address of ours (ip6tables-save shows no tag)."""
        interceptor = intercept6(lab6, mode)
        assert lab6.tagged() != []
        interceptor.teardown()
        assert lab6.tagged() == []

    @pytest.mark.parametrize("mode", MODES)
    def test_check_and_sync_restore_ipv6_rules_and_address(self, lab6: Lab6, mode: str) -> None:
        """check() names a flushed IPv6 table and a removed /128; sync() restores both."""
        interceptor = intercept6(lab6, mode)
        assert interceptor.check() == []
        table = "raw" if mode == "nodelocal" else "nat"
        chain = "PREROUTING"
        lab6.sh(lab6.node, "ip6tables", "-w", "5", "-t", table, "-F", chain)
        lab6.sh(lab6.node, "ip", "-6", "addr", "del", f"{LOCAL_IP6}/128", "dev", "lo", check=False)
        lab6.sh(lab6.node, "ip", "-6", "addr", "del", f"{LOCAL_IP6}/128", "dev", "nodelocaldns", check=False)
        missing = interceptor.check()
        assert f"address {LOCAL_IP6}/128" in missing
        assert any(item.startswith(f"ip6 {table} {chain}") for item in missing)
        assert interceptor.sync() != []
        assert interceptor.check() == []
        if mode == "nodelocal":
            assert lookup6(lab6, "udp", "synced.example") == tn.ANSWER_LOCAL

    @pytest.mark.parametrize("mode", MODES)
    def test_leftovers_of_a_dead_instance_removed(self, lab6: Lab6, mode: str) -> None:
        """A fresh Interceptor (after kill -9) removes the IPv6 rules and addresses a previous one left."""
        intercept6(lab6, mode)
        interceptor6(lab6, mode).remove_leftovers()
        assert lab6.tagged() == []
        # Even one configured for IPv4 only finds them: a restart with another configuration cleans up.
        again = interceptor6(lab6, mode)  # the stand-in of the first install still listens
        again.add_addresses()
        again.install_rules()
        assert lab6.tagged() != []
        v4_only = netsetup.InterceptSpec(mode="nodelocal", local_ips=(tn.LINK_LOCAL,))
        netsetup.Interceptor(v4_only, structlog.get_logger(), runner=lab6.runner(lab6.node)).remove_leftovers()
        assert lab6.tagged() == []


def proxy_argv6(mode: str, local_ips: tuple[str, ...] = Lab6.local_ips, log_queries: bool = True) -> list[str]:
    """Return the proxy command line for an IPv6-only (or, with both families' local IPs, dual-stack) node.

    It listens where the interception sends queries and forwards to the upstream Service of each family;
    ``log_queries``: one debug line per query (too much for the takeover tests' load).
    """
    argv = [sys.executable, str(tn.ROOT / "proxy.py")]
    for ip in spec6(mode, local_ips).wanted_addresses():
        argv += ["--listen", endpoint(ip)]
    for ip in local_ips:
        argv += ["--local-ip", ip]
    for family, service_ip in ((4, tn.UPSTREAM_SERVICE_IP), (6, UPSTREAM_SERVICE_IP6)):
        if family in spec6(mode, local_ips).families:
            argv += ["--upstream", endpoint(service_ip)]
    return [
        *argv,
        *("--intercept", mode, "--http", endpoint(local_ips[0], tn.HEALTH_PORT), "--sync-interval", "1"),
        *(("--log-queries", "--log-level", "debug") if log_queries else ()),
    ]


def start_proxy6(lab: Lab6, mode: str, name: str = "proxy") -> Any:
    """Start proxy.py in the node namespace; wait until the pod is answered through it at each ClusterIP."""
    argv = [*proxy_argv6(mode, lab.local_ips), "--state-dir", str(lab.workdir / "state")]
    proxy = lab.start(lab.node, name, argv)
    cluster_ips = spec6("dnat", lab.local_ips).cluster_ips

    def answered() -> bool:
        if proxy.poll() is not None:
            raise AssertionError(f"proxy.py exited: {proxy.log_path.read_text()[-2000:]}")
        return all(lab.dig(ip, "ready.example") == tn.ANSWER_VIA_PROXY for ip in cluster_ips)

    tn.wait_for(answered, 15, f"the pod is answered through proxy.py ({proxy.log_path})")
    tn.wait_for(lambda: '"event": "serving"' in proxy.log_path.read_text(), 15, "proxy.py logs serving")
    return proxy


@pytest.mark.timeout(120)
class TestIPv6ProxyEndToEnd:
    """proxy.py --intercept MODE on an IPv6-only node, with the watchdog probing over IPv6."""

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("transport", TRANSPORTS6)
    def test_pod_lookups_go_through_the_proxy(self, lab6: Lab6, mode: str, transport: str) -> None:
        """The pod's IPv6 lookups are answered through the proxy, which forwards to the IPv6 upstream Service."""
        proxy = start_proxy6(lab6, mode)
        qname = f"{transport}-{mode}.example"
        assert (lookup6(lab6, transport, qname), qname in proxy.log_path.read_text()) == (tn.ANSWER_VIA_PROXY, True)

    @pytest.mark.parametrize("mode", MODES)
    def test_sigterm_falls_back_and_leaves_nothing_tagged(self, lab6: Lab6, mode: str) -> None:
        """After SIGTERM kube-dns answers over IPv6 and no rule or address of ours is left."""
        proxy = start_proxy6(lab6, mode)
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=10) == 0
        assert (lookup6(lab6, "udp", "s.example"), lab6.tagged()) == (tn.ANSWER_KUBE_DNS, [])

    @pytest.mark.parametrize("mode", MODES)
    def test_kill9_with_watchdog_outage_under_goal(
        self, lab6: Lab6, mode: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """After kill -9 of proxy.py the watchdog (probing [fd00::10]:53) brings kube-dns back in under 2 s."""
        proxy = start_proxy6(lab6, mode)
        tn.start_watchdog(lab6, f"[{LOCAL_IP6}]:53")
        outage = tn.outage_after_kill(lab6, proxy, CLUSTER_IP6)
        with capsys.disabled():
            print(f"\n[ipv6 {mode}] proxy.py: time without DNS after kill -9 (watchdog): {outage:.3f} s")
        assert outage < tn.OUTAGE_GOAL
        tn.wait_for(lambda: lab6.tagged() == [], 5, "the watchdog removed every IPv6 rule and address")

    @pytest.mark.parametrize("mode", MODES)
    def test_restart_after_kill9_removes_leftovers_first(self, lab6: Lab6, mode: str) -> None:
        """A restarted proxy removes the IPv6 leftovers before installing: no duplicate rule."""
        first = start_proxy6(lab6, mode, "proxy-1")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=5)
        second = start_proxy6(lab6, mode, "proxy-2")
        tn.wait_for(lambda: "intercept_rules_installed" in second.log_path.read_text(), 5, "installed")
        spec = interceptor6(lab6, mode).spec
        assert lab6.count_rules6() == len(spec.rules())


# -- the dual-stack lab: the IPv4 lab and the IPv6 one on the same links, a ClusterIP per family ----

DUAL_LOCAL_IPS = (tn.LINK_LOCAL, tn.CLUSTER_IP, LOCAL_IP6, CLUSTER_IP6)
FAMILIES = {"ipv4": tn.CLUSTER_IP, "ipv6": CLUSTER_IP6}


class DualStackLab(Lab6):
    """The IPv4 lab with the IPv6 addresses, routes and kube-proxy rules added: each ClusterIP works alone."""

    local_ips = DUAL_LOCAL_IPS
    pod_nameservers = (tn.CLUSTER_IP, CLUSTER_IP6)  # a dual-stack pod: one nameserver line per family

    def setup(self) -> None:
        """Build the IPv4 lab, then add IPv6 to the same links, kube-proxy and kube-dns."""
        tn.Lab.setup(self)
        self.write_resolv_conf()
        self.add_ipv6()

    def tagged(self) -> list[str]:
        """Return every rule (iptables-save and ip6tables-save), address and interface of ours on the node."""
        return sorted(set(tn.Lab.tagged(self)) | set(Lab6.tagged(self)))


@pytest.fixture
def dual_lab(tmp_path: Path) -> Iterator[DualStackLab]:
    """Provide a fresh dual-stack pod/node/upstream lab, deleted afterwards even on failure."""
    the_lab = DualStackLab(tmp_path)
    try:
        the_lab.setup()
        yield the_lab
    finally:
        the_lab.close()


def lookups(lab: Lab6, transport: str, qname: str) -> dict[str, str]:
    """Resolve qname through the IPv4 and through the IPv6 ClusterIP; return the answer per family."""
    return {family: lookup6(lab, transport, f"{family}-{qname}", ip) for family, ip in FAMILIES.items()}


def everywhere(answer: str) -> dict[str, str]:
    return dict.fromkeys(FAMILIES, answer)


@pytest.mark.timeout(120)
class TestDualStackInterception:
    """netsetup.Interceptor with an IPv4 and an IPv6 local IP and ClusterIP on one node."""

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("transport", TRANSPORTS6)
    def test_both_cluster_ips_answered_locally(self, dual_lab: DualStackLab, mode: str, transport: str) -> None:
        """Both ClusterIPs are answered on the node, then by kube-dns through kube-proxy after teardown."""
        before = lookups(dual_lab, transport, "before.example")
        interceptor = intercept6(dual_lab, mode)
        during = lookups(dual_lab, transport, "during.example")
        interceptor.teardown()
        after = lookups(dual_lab, transport, "after.example")
        assert (before, during, after) == (
            everywhere(tn.ANSWER_KUBE_DNS),
            everywhere(tn.ANSWER_LOCAL),
            everywhere(tn.ANSWER_KUBE_DNS),
        )

    @pytest.mark.parametrize("mode", MODES)
    def test_pod_with_both_nameserver_lines(self, dual_lab: DualStackLab, mode: str) -> None:
        """glibc in a pod whose resolv.conf names both ClusterIPs is answered locally, then by kube-dns."""
        dual_lab.write_resolv_conf()
        interceptor = intercept6(dual_lab, mode)
        during = dual_lab.getent("both.example")
        interceptor.teardown()
        assert (during, dual_lab.getent("after.example")) == (tn.ANSWER_LOCAL, tn.ANSWER_KUBE_DNS)

    @pytest.mark.parametrize("mode", MODES)
    def test_nothing_tagged_left_after_teardown(self, dual_lab: DualStackLab, mode: str) -> None:
        """Teardown removes the rules of both families (iptables-save and ip6tables-save) and every address."""
        interceptor = intercept6(dual_lab, mode)
        families = {4 if item.startswith("iptables") else 6 for item in dual_lab.tagged() if "-save: " in item}
        interceptor.teardown()
        assert (families, dual_lab.tagged()) == ({4, 6}, [])


@pytest.mark.timeout(120)
class TestDualStackProxyEndToEnd:
    """proxy.py --intercept MODE on a dual-stack node: one process serves both families."""

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("transport", TRANSPORTS6)
    def test_pod_lookups_go_through_the_proxy(self, dual_lab: DualStackLab, mode: str, transport: str) -> None:
        """Lookups through the IPv4 and through the IPv6 ClusterIP are answered by the proxy, which logs them."""
        proxy = start_proxy6(dual_lab, mode)
        answers = lookups(dual_lab, transport, f"{transport}-{mode}.example")
        logged = {family: f"{family}-{transport}-{mode}.example" in proxy.log_path.read_text() for family in FAMILIES}
        assert (answers, logged) == (everywhere(tn.ANSWER_VIA_PROXY), dict.fromkeys(FAMILIES, True))

    @pytest.mark.parametrize("mode", MODES)
    def test_sigterm_falls_back_and_leaves_nothing_tagged(self, dual_lab: DualStackLab, mode: str) -> None:
        """After SIGTERM kube-dns answers at both ClusterIPs and no rule or address of either family is left."""
        proxy = start_proxy6(dual_lab, mode)
        proxy.send_signal(signal.SIGTERM)
        code = proxy.wait(timeout=10)
        assert (code, lookups(dual_lab, "udp", "s.example"), dual_lab.tagged()) == (
            0,
            everywhere(tn.ANSWER_KUBE_DNS),
            [],
        )

    @pytest.mark.parametrize("mode", MODES)
    def test_kill9_with_watchdog_outage_under_goal(
        self, dual_lab: DualStackLab, mode: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """After kill -9 the watchdog brings kube-dns back at both ClusterIPs in under 2 s, and removes everything."""
        proxy = start_proxy6(dual_lab, mode)
        tn.start_watchdog(dual_lab, f"[{LOCAL_IP6}]:53")
        outages = tn.outages_after_kill(dual_lab, proxy, tuple(FAMILIES.values()))
        with capsys.disabled():
            times = ", ".join(f"{family} {outages[ip]:.3f} s" for family, ip in FAMILIES.items())
            print(f"\n[dual-stack {mode}] proxy.py: time without DNS after kill -9 (watchdog): {times}")
        assert max(outages.values()) < tn.OUTAGE_GOAL
        tn.wait_for(lambda: dual_lab.tagged() == [], 5, "the watchdog removed the rules and addresses of both families")
