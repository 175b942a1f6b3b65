"""Interception end to end in network namespaces: netsetup.Interceptor, watchdog.py, proxy.py.

Topology (a node as Kubernetes builds it), only 169.254.0.0/16 addresses, in namespaces each test creates and deletes:

  [pod] p0 169.254.100.2 --veth-- n0 169.254.100.1 [node] n1 169.254.101.1 --veth-- u0 [up]
  resolv.conf -> 169.254.96.10                     rules, proxy         169.254.101.2 kube-dns pod
                                                                        169.254.101.3 kube-dns-proxy-upstream

169.254.96.10 stands in for the kube-dns ClusterIP (10.96.0.10), 169.254.96.11 for the
kube-dns-proxy-upstream ClusterIP; a KUBE-SERVICES chain in the node's nat table stands in for
kube-proxy.  Answers identify who answered: 169.254.0.1 = kube-dns reached through kube-proxy
(the fallback), 169.254.0.2 = the node-local stand-in responder, 169.254.0.3 = the upstream
Service reached by the proxy.

Run as a script, this file is the stand-in DNS responder and the pod's outage meter
(``respond`` and ``measure``), started inside a namespace with ``ip netns exec``.

TestProxyEndToEnd starts the real ``python proxy.py --intercept ...``: those tests pass once the
lead has wired netsetup into proxy.py (they replace the stand-in responder by the proxy).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dnslib
import pytest
import structlog

import handover
import netsetup
import watchdog
import wire

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
TAG = "kube-dns-proxy"

POD_IP = "169.254.100.2"
NODE_POD_SIDE = "169.254.100.1"
NODE_UP_SIDE = "169.254.101.1"
KUBE_DNS_ENDPOINT = "169.254.101.2"
UPSTREAM_ENDPOINT = "169.254.101.3"
CLUSTER_IP = "169.254.96.10"
UPSTREAM_SERVICE_IP = "169.254.96.11"
LINK_LOCAL = "169.254.20.10"
HEALTH_PORT = 9254

ANSWER_KUBE_DNS = "169.254.0.1"
ANSWER_LOCAL = "169.254.0.2"
ANSWER_VIA_PROXY = "169.254.0.3"

IP_FREEBIND = 15  # linux/in.h; not exported by Python 3.11's socket module
IPV6_FREEBIND = 78  # linux/in6.h
OUTAGE_GOAL = 2.0


# -- the script side: stand-in responder and outage meter -------------------------------------


def _answer(data: bytes, answer_ip: str) -> bytes | None:
    try:
        query = dnslib.DNSRecord.parse(data)
    except Exception:  # a stand-in: anything unparseable is simply not answered
        return None
    reply = query.reply()
    if query.q.qtype == dnslib.QTYPE.A:
        reply.add_answer(dnslib.RR(query.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(answer_ip), ttl=5))
    return reply.pack()


def _serve_udp(sock: socket.socket, answer_ip: str) -> None:
    while True:
        data, peer = sock.recvfrom(4096)
        reply = _answer(data, answer_ip)
        if reply is not None:
            sock.sendto(reply, peer)


def _serve_tcp_client(conn: socket.socket, answer_ip: str) -> None:
    with conn:
        conn.settimeout(5)
        while True:
            head = conn.recv(2)
            if len(head) < 2:
                return
            size = int.from_bytes(head, "big")
            data = b""
            while len(data) < size:
                chunk = conn.recv(size - len(data))
                if not chunk:
                    return
                data += chunk
            reply = _answer(data, answer_ip)
            if reply is None:
                return
            conn.sendall(len(reply).to_bytes(2, "big") + reply)


def _serve_tcp(sock: socket.socket, answer_ip: str) -> None:
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_serve_tcp_client, args=(conn, answer_ip), daemon=True).start()


def respond(pairs: list[str]) -> None:
    """Answer A queries on each ADDRESS[:PORT]=ANSWER ([V6]:PORT=ANSWER) pair, UDP and TCP, until killed."""
    for pair in pairs:
        address, answer_ip = pair.split("=")
        if address.startswith("["):
            host, _, port = address[1:].partition("]:")
        else:
            host, _, port = address.partition(":")
        bind = (host, int(port or 53))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        for sock in (udp, tcp):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Like the proxy: bind before the address is on the interface.
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.bind(bind)
        tcp.listen(16)
        threading.Thread(target=_serve_udp, args=(udp, answer_ip), daemon=True).start()
        threading.Thread(target=_serve_tcp, args=(tcp, answer_ip), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def query_once(server: str, qname: str, timeout: float) -> str:
    """Return the first A address of one UDP query on a fresh socket, or 'error:<reason>'."""
    query = dnslib.DNSRecord.question(qname, "A")
    try:
        with socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((server, 53))
            sock.send(query.pack())
            reply = dnslib.DNSRecord.parse(sock.recv(4096))
    except OSError as exc:
        return f"error:{type(exc).__name__}"
    if reply.header.id != query.header.id or not reply.rr:
        return "error:bad-reply"
    return str(reply.rr[0].rdata)


def measure(server: str, qname: str, stop_answer: str, duration: float) -> None:
    """Query every 20 ms, print one JSON line per query; stop after 10 stop_answer in a row."""
    deadline = time.monotonic() + duration
    in_a_row = 0
    while time.monotonic() < deadline and in_a_row < 10:
        sent = time.monotonic()
        answer = query_once(server, qname, 0.1)
        print(json.dumps({"sent": sent, "done": time.monotonic(), "answer": answer}), flush=True)
        in_a_row = in_a_row + 1 if answer == stop_answer else 0
        time.sleep(max(0.0, sent + 0.02 - time.monotonic()))


# -- the lab ----------------------------------------------------------------------------------


def _run(argv: list[str], timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


class Lab:
    """Three namespaces wired as pod -> node -> kube-dns, with processes started in them."""

    def __init__(self, workdir: Path) -> None:
        suffix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.pod = f"kdp-pod-{suffix}"
        self.node = f"kdp-node-{suffix}"
        self.up = f"kdp-up-{suffix}"
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.created: list[str] = []

    # commands

    def sh(self, ns: str, *argv: str, check: bool = True, timeout: float = 20) -> Any:
        """Run argv inside namespace ``ns``."""
        return _run(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check)

    def runner(self, ns: str) -> Callable[..., subprocess.CompletedProcess]:
        """Return a netsetup runner that executes every argv inside ``ns``."""

        def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
            return subprocess.run(["ip", "netns", "exec", ns, *argv], **kwargs)

        return run

    def start(self, ns: str, name: str, argv: list[str], ready: str | None = None) -> Any:
        """Start argv in ``ns`` with output to a new log file (``proc.log_path``); wait for ``ready`` in it.

        Each start gets a file of its own: NAME.log, then NAME.2.log, ... for a name started again,
        so that a restarted process's readiness is never read from its predecessor's output.
        """
        log_path = self.workdir / f"{name}.log"
        number = 1
        while log_path.exists():
            number += 1
            log_path = self.workdir / f"{name}.{number}.log"
        with open(log_path, "xb") as log_file:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        if ready is not None:

            def is_ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited: {log_path.read_text()[-2000:]}")
                return ready in log_path.read_text()

            wait_for(is_ready, 10, f"{name} printed {ready!r}")
        return proc

    def respond(self, ns: str, name: str, *pairs: str) -> Any:
        """Start the stand-in responder in ``ns``."""
        return self.start(ns, name, [sys.executable, str(THIS), "respond", *pairs], "ready")

    # setup and teardown

    def setup(self) -> None:
        """Create the namespaces, links, routes, resolv.conf files and the kube-proxy stand-in."""
        for ns in (self.pod, self.node, self.up):
            _run(["ip", "netns", "add", ns])
            self.created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for ns, nameserver in (
            (self.pod, CLUSTER_IP),
            (self.node, UPSTREAM_SERVICE_IP),
            (self.up, UPSTREAM_SERVICE_IP),
        ):
            # Never the host's resolv.conf: every namespace resolves inside the lab only.
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:2\n")
        commands = [
            ["-n", self.node, "link", "add", "n0", "type", "veth", "peer", "name", "p0", "netns", self.pod],
            ["-n", self.node, "link", "add", "n1", "type", "veth", "peer", "name", "u0", "netns", self.up],
            ["-n", self.node, "addr", "add", f"{NODE_POD_SIDE}/30", "dev", "n0"],
            ["-n", self.pod, "addr", "add", f"{POD_IP}/30", "dev", "p0"],
            ["-n", self.node, "addr", "add", f"{NODE_UP_SIDE}/29", "dev", "n1"],
            ["-n", self.up, "addr", "add", f"{KUBE_DNS_ENDPOINT}/29", "dev", "u0"],
            ["-n", self.up, "addr", "add", f"{UPSTREAM_ENDPOINT}/29", "dev", "u0"],
            ["-n", self.node, "link", "set", "n0", "up"],
            ["-n", self.node, "link", "set", "n1", "up"],
            ["-n", self.pod, "link", "set", "p0", "up"],
            ["-n", self.up, "link", "set", "u0", "up"],
            ["-n", self.pod, "route", "add", "169.254.96.0/24", "via", NODE_POD_SIDE],
            ["-n", self.pod, "route", "add", f"{LINK_LOCAL}/32", "via", NODE_POD_SIDE],
            # The node's default route stands behind the Service CIDR, as on a real node.
            ["-n", self.node, "route", "add", "169.254.96.0/24", "via", KUBE_DNS_ENDPOINT],
            ["-n", self.up, "route", "add", "169.254.100.0/30", "via", NODE_UP_SIDE],
        ]
        for args in commands:
            _run(["ip", *args])
        self.sh(self.node, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        self.sh(self.node, "sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=0")
        self.sh(self.node, "iptables", "-w", "5", "-t", "nat", "-N", "KUBE-SERVICES")
        for service_ip, endpoint in (
            (CLUSTER_IP, KUBE_DNS_ENDPOINT),
            (UPSTREAM_SERVICE_IP, UPSTREAM_ENDPOINT),
        ):
            for proto in ("udp", "tcp"):
                self.sh(
                    self.node,
                    "iptables",
                    "-w",
                    "5",
                    "-t",
                    "nat",
                    "-A",
                    "KUBE-SERVICES",
                    "-d",
                    f"{service_ip}/32",
                    "-p",
                    proto,
                    "-m",
                    proto,
                    "--dport",
                    "53",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    f"{endpoint}:53",
                )
        for chain in ("PREROUTING", "OUTPUT"):
            self.sh(self.node, "iptables", "-w", "5", "-t", "nat", "-I", chain, "1", "-j", "KUBE-SERVICES")
        self.respond(
            self.up,
            "kube-dns",
            f"{KUBE_DNS_ENDPOINT}={ANSWER_KUBE_DNS}",
            f"{UPSTREAM_ENDPOINT}={ANSWER_VIA_PROXY}",
        )

    def close(self) -> None:
        """Kill what was started (by PID) and delete the namespaces and their /etc/netns."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)

    # observations

    def dig(
        self,
        server: str,
        qname: str,
        *,
        tcp: bool = False,
        ns: str | None = None,
        source_port: int | None = None,
        timeout: int = 1,
    ) -> str:
        """Return dig's first answer line (or its error) for an A query from the pod (one try)."""
        argv = ["dig", f"@{server}", f"+time={timeout}", "+tries=1", "+short", qname, "A"]
        if tcp:
            argv.append("+tcp")
        if source_port is not None:
            argv += ["-b", f"{POD_IP}#{source_port}"]
        proc = self.sh(ns or self.pod, *argv, check=False)
        lines = proc.stdout.strip().splitlines()
        return lines[0] if lines else f"error:rc={proc.returncode}"

    def getent(self, qname: str) -> str:
        """Return the address glibc resolves for qname in the pod (resolv.conf of the pod)."""
        proc = self.sh(self.pod, "getent", "hosts", qname, check=False)
        return proc.stdout.split()[0] if proc.stdout.split() else f"error:rc={proc.returncode}"

    def tagged(self) -> list[str]:
        """Return every rule, address and interface carrying our tag in the node namespace."""
        found = []
        for save in ("iptables-nft-save", "iptables-legacy-save"):
            for line in self.sh(self.node, save).stdout.splitlines():
                if f"--comment {TAG}" in line:
                    found.append(f"{save}: {line}")
        for link in json.loads(self.sh(self.node, "ip", "-j", "-d", "addr", "show").stdout):
            if link.get("ifalias") == TAG:
                found.append(f"interface {link['ifname']}")
            label = netsetup.address_label(link["ifname"], TAG)
            for info in link.get("addr_info", []):
                if info.get("label") == label or info.get("local") in (LINK_LOCAL, CLUSTER_IP):
                    found.append(f"address {info['local']} on {link['ifname']}")
        return found

    def count_rules(self, save: str = "iptables-nft-save") -> int:
        """Return how many rules with our tag the node has in one backend."""
        out = self.sh(self.node, save).stdout
        return sum(f"--comment {TAG}" in line for line in out.splitlines())

    def route_localnet(self) -> str:
        """Return the node's net.ipv4.conf.all.route_localnet."""
        return self.sh(self.node, "sysctl", "-n", netsetup.ROUTE_LOCALNET).stdout.strip()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll predicate every 50 ms for at most ``timeout`` seconds; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting until {what}")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """Provide a fresh pod/node/upstream lab, deleted afterwards even on failure."""
    the_lab = Lab(tmp_path)
    try:
        the_lab.setup()
        yield the_lab
    finally:
        the_lab.close()


def make_interceptor(lab: Lab, mode: str, **kwargs: Any) -> netsetup.Interceptor:
    """Return an Interceptor whose commands run in the lab's node namespace."""
    local_ips = (LINK_LOCAL, CLUSTER_IP)
    if mode == "nodelocal":
        kwargs.setdefault("health_port", HEALTH_PORT)
    spec = netsetup.InterceptSpec(mode=mode, local_ips=local_ips, **kwargs)
    log = structlog.get_logger().bind(test_lab=lab.node)
    return netsetup.Interceptor(spec, log, runner=lab.runner(lab.node))


def start_stand_in(lab: Lab, mode: str, target: str | None = None) -> Any:
    """Start the node-local stand-in responder where the mode's proxy would listen."""
    if mode == "nodelocal":
        pairs = [f"{LINK_LOCAL}={ANSWER_LOCAL}", f"{CLUSTER_IP}={ANSWER_LOCAL}"]
    else:
        pairs = [f"{target or LINK_LOCAL + ':53'}={ANSWER_LOCAL}"]
    return lab.respond(lab.node, "stand-in", *pairs)


def intercept(lab: Lab, mode: str, **kwargs: Any) -> netsetup.Interceptor:
    """Start the stand-in, then follow the proxy's order: leftovers, addresses, rules."""
    start_stand_in(lab, mode, kwargs.get("dnat_target"))
    interceptor = make_interceptor(lab, mode, **kwargs)
    interceptor.remove_leftovers()
    interceptor.add_addresses()
    interceptor.install_rules()
    return interceptor


def lookup(lab: Lab, transport: str, qname: str) -> str:
    """Resolve qname from the pod through the fake kube-dns ClusterIP with one transport."""
    if transport == "glibc":
        return lab.getent(qname)
    # One try, 3 s: a miss goes through the proxy to the Python stand-in kube-dns, which on a
    # loaded CI machine can take more than dig's usual 1 s.
    return lab.dig(CLUSTER_IP, qname, tcp=transport == "tcp", timeout=3)


TRANSPORTS = ["udp", "tcp", "glibc"]


# -- pure checks ------------------------------------------------------------------------------


class TestRestoreInput:
    """The rules batched into one iptables-restore are written in its own syntax, not a shell's."""

    def test_brackets_and_colons_unquoted_spaces_double_quoted(self) -> None:
        """An IPv6 DNAT target stays bare (restore keeps single quotes literally); a comment with a space is grouped."""
        line = netsetup._restore_line(["-I", "OUTPUT", "1", "--to-destination", "[fd00::10]:53", "--comment", "a b"])
        assert line == '-I OUTPUT 1 --to-destination [fd00::10]:53 --comment "a b"'


class TestInterceptSpec:
    """Validation and rule sets of InterceptSpec (no root needed)."""

    def test_unknown_mode_rejected(self) -> None:
        """An unknown mode raises InterceptError."""
        with pytest.raises(netsetup.InterceptError, match="mode"):
            netsetup.InterceptSpec(mode="redirect", local_ips=(LINK_LOCAL,))

    def test_ipv6_link_local_local_ip_rejected(self) -> None:
        """An fe80:: local IP raises InterceptError: a resolv.conf line cannot name its zone."""
        with pytest.raises(netsetup.InterceptError, match="zone"):
            netsetup.InterceptSpec(mode="nodelocal", local_ips=("fe80::10",))

    def test_loopback_local_ip_rejected_in_nodelocal(self) -> None:
        """nodelocal refuses a loopback local IP, which teardown would remove from lo."""
        with pytest.raises(netsetup.InterceptError, match="cannot be put"):
            netsetup.InterceptSpec(mode="nodelocal", local_ips=("127.0.0.1",))

    def test_dnat_needs_a_cluster_ip(self) -> None:
        """dnat mode without a ClusterIP after the proxy's IP raises InterceptError."""
        with pytest.raises(netsetup.InterceptError, match="ClusterIP"):
            netsetup.InterceptSpec(mode="dnat", local_ips=(LINK_LOCAL,))

    def test_bad_dnat_target_rejected(self) -> None:
        """A dnat target that is not IPv4 ADDRESS:PORT raises InterceptError."""
        with pytest.raises(netsetup.InterceptError, match="dnat target"):
            netsetup.InterceptSpec(mode="dnat", local_ips=(LINK_LOCAL, CLUSTER_IP), dnat_target="localhost:53")

    def test_dnat_target_defaults_to_first_local_ip(self) -> None:
        """Without dnat_target the DNAT points at the first local IP and the port."""
        spec = netsetup.InterceptSpec(mode="dnat", local_ips=(LINK_LOCAL, CLUSTER_IP))
        assert spec.target == (LINK_LOCAL, 53)

    @pytest.mark.parametrize(("health_port", "per_ip"), [(None, 10), (HEALTH_PORT, 12)])
    def test_nodelocal_rule_count_matches_node_cache(self, health_port: int | None, per_ip: int) -> None:
        """nodelocal installs node-cache's rules: 10 per IP, 12 with the health port."""
        spec = netsetup.InterceptSpec(mode="nodelocal", local_ips=(LINK_LOCAL, CLUSTER_IP), health_port=health_port)
        assert len(spec.rules()) == 2 * per_ip

    def test_diverting_rules_installed_last(self) -> None:
        """The NOTRACK rules for queries come after the ACCEPT and reply rules."""
        spec = netsetup.InterceptSpec(mode="nodelocal", local_ips=(LINK_LOCAL,))
        kinds = ["-d" in rule.match and rule.table == "raw" for rule in spec.rules()]
        assert kinds == sorted(kinds)

    def test_address_label_fits_ifnamsiz(self) -> None:
        """The address label stays within the kernel's 15 characters."""
        assert len(netsetup.address_label("nodelocaldns", TAG)) == 15


# -- nodelocal mode ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
class TestNodelocal:
    """nodelocal mode: local /32s and NOTRACK rules, fallback by removing the rules."""

    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_cluster_ip_answered_locally(self, lab: Lab, transport: str) -> None:
        """With the rules in place the pod's queries to the ClusterIP reach the local responder."""
        intercept(lab, "nodelocal")
        assert lookup(lab, transport, "a.example") == ANSWER_LOCAL

    def test_link_local_ip_answered_locally(self, lab: Lab) -> None:
        """The link-local address answers the pod too."""
        intercept(lab, "nodelocal")
        assert lab.dig(LINK_LOCAL, "b.example") == ANSWER_LOCAL

    def test_query_from_node_itself_answered_locally(self, lab: Lab) -> None:
        """The node's own queries (raw OUTPUT) reach the local responder, not kube-dns."""
        intercept(lab, "nodelocal")
        assert lab.dig(CLUSTER_IP, "c.example", ns=lab.node) == ANSWER_LOCAL

    def test_intercepted_queries_leave_no_conntrack_entry(self, lab: Lab) -> None:
        """NOTRACK keeps intercepted queries out of conntrack (no insert race)."""
        intercept(lab, "nodelocal")
        lab.dig(CLUSTER_IP, "d.example")
        entries = lab.sh(lab.node, "conntrack", "-L", "-d", CLUSTER_IP).stdout
        assert CLUSTER_IP not in entries

    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_falls_back_to_kube_dns_after_teardown(self, lab: Lab, transport: str) -> None:
        """After teardown the same lookups are answered by kube-dns through kube-proxy."""
        interceptor = intercept(lab, "nodelocal")
        interceptor.teardown()
        assert lookup(lab, transport, "e.example") == ANSWER_KUBE_DNS

    def test_nothing_tagged_left_after_teardown(self, lab: Lab) -> None:
        """Teardown leaves no rule, address or interface of ours."""
        intercept(lab, "nodelocal").teardown()
        assert lab.tagged() == []

    def test_remove_rules_falls_back_but_keeps_addresses(self, lab: Lab) -> None:
        """remove_rules() alone sends queries to kube-dns while our addresses stay for draining."""
        interceptor = intercept(lab, "nodelocal")
        interceptor.remove_rules()
        kept = [item for item in lab.tagged() if item.startswith("address")]
        assert (lab.dig(CLUSTER_IP, "t.example"), len(kept)) == (ANSWER_KUBE_DNS, 2)

    def test_install_twice_adds_no_duplicate(self, lab: Lab) -> None:
        """A second add/install finds everything in place and adds nothing."""
        interceptor = intercept(lab, "nodelocal")
        interceptor.add_addresses()
        interceptor.install_rules()
        assert lab.count_rules() == len(interceptor.spec.rules())

    def test_sync_reports_nothing_when_intact(self, lab: Lab) -> None:
        """sync() on an intact setup restores nothing."""
        assert intercept(lab, "nodelocal").sync() == []

    def test_sync_restores_flushed_raw_table(self, lab: Lab) -> None:
        """Rules flushed by another agent come back on the next sync and divert again."""
        interceptor = intercept(lab, "nodelocal")
        lab.sh(lab.node, "iptables", "-w", "5", "-t", "raw", "-F")
        restored = interceptor.sync()
        raw_rules = [rule for rule in interceptor.spec.rules() if rule.table == "raw"]
        assert (len(restored), lab.dig(CLUSTER_IP, "f.example")) == (len(raw_rules), ANSWER_LOCAL)

    def test_sync_restores_removed_address(self, lab: Lab) -> None:
        """An address removed by another agent comes back on the next sync."""
        interceptor = intercept(lab, "nodelocal")
        lab.sh(lab.node, "ip", "addr", "del", f"{CLUSTER_IP}/32", "dev", "lo")
        assert [item for item in interceptor.sync() if CLUSTER_IP in item] == [f"address {CLUSTER_IP}/32 on lo"]

    def test_rules_present_when_installed(self, lab: Lab) -> None:
        """rules_present() is true once addresses and rules are in place."""
        assert intercept(lab, "nodelocal").rules_present() is True

    def test_rules_present_false_when_a_rule_is_missing(self, lab: Lab) -> None:
        """rules_present() turns false when one of our rules is deleted."""
        interceptor = intercept(lab, "nodelocal")
        rule = interceptor.spec.rules()[-1]
        lab.sh(lab.node, "iptables", "-w", "5", "-t", rule.table, "-D", rule.chain, *rule.args(TAG))
        assert interceptor.rules_present() is False

    def test_rules_present_false_after_teardown(self, lab: Lab) -> None:
        """rules_present() is false after teardown."""
        interceptor = intercept(lab, "nodelocal")
        interceptor.teardown()
        assert interceptor.rules_present() is False

    def test_remove_leftovers_after_kill9(self, lab: Lab) -> None:
        """A new Interceptor removes what a SIGKILLed process left, and DNS falls back."""
        start_stand_in(lab, "nodelocal")
        code = (
            "import time, structlog, netsetup\n"
            f"spec = netsetup.InterceptSpec(mode='nodelocal', local_ips={(LINK_LOCAL, CLUSTER_IP)})\n"
            "i = netsetup.Interceptor(spec, structlog.get_logger())\n"
            "i.add_addresses(); i.install_rules(); print('installed', flush=True)\n"
            "time.sleep(60)\n"
        )
        crashed = lab.start(lab.node, "crashing", [sys.executable, "-c", code], "installed")
        crashed.send_signal(signal.SIGKILL)
        crashed.wait(timeout=5)
        make_interceptor(lab, "nodelocal").remove_leftovers()
        assert (lab.tagged(), lab.dig(CLUSTER_IP, "g.example")) == ([], ANSWER_KUBE_DNS)

    def test_foreign_rules_and_addresses_survive_teardown(self, lab: Lab) -> None:
        """Teardown removes only what carries our tag: others' rules and addresses stay."""
        lab.sh(
            lab.node,
            "iptables",
            "-w",
            "5",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-d",
            "169.254.30.1/32",
            "-m",
            "comment",
            "--comment",
            "someone-else",
            "-j",
            "NOTRACK",
        )
        lab.sh(lab.node, "ip", "addr", "add", "169.254.30.1/32", "dev", "lo")
        intercept(lab, "nodelocal").teardown()
        rules = lab.sh(lab.node, "iptables", "-t", "raw", "-S", "PREROUTING").stdout
        addresses = lab.sh(lab.node, "ip", "-4", "addr", "show", "dev", "lo").stdout
        assert ("someone-else" in rules, "169.254.30.1/32" in addresses) == (True, True)

    def test_addresses_on_dummy_if_kernel_has_it_else_lo(self, lab: Lab) -> None:
        """The /32s go on the dummy interface where the kernel has one, else on lo."""
        probe = lab.sh(lab.node, "ip", "link", "add", "kdpprobe", "type", "dummy", check=False)
        lab.sh(lab.node, "ip", "link", "del", "kdpprobe", check=False)
        expected = "nodelocaldns" if probe.returncode == 0 else "lo"
        intercept(lab, "nodelocal")
        shown = lab.sh(lab.node, "ip", "-4", "-o", "addr", "show", "to", f"{CLUSTER_IP}/32")
        assert shown.stdout.split()[1] == expected

    def test_existing_empty_interface_adopted_then_deleted(self, lab: Lab) -> None:
        """An empty interface of our name is used for the /32s and deleted by teardown."""
        lab.sh(lab.node, "ip", "link", "add", "nodelocaldns", "type", "veth", "peer", "name", "nodelocaldns-p")
        interceptor = intercept(lab, "nodelocal")
        shown = lab.sh(lab.node, "ip", "-4", "-o", "addr", "show", "dev", "nodelocaldns").stdout
        answered = lab.dig(CLUSTER_IP, "h.example")
        interceptor.teardown()
        gone = lab.sh(lab.node, "ip", "link", "show", "nodelocaldns", check=False).returncode
        assert (CLUSTER_IP in shown, answered, gone) == (True, ANSWER_LOCAL, 1)


# -- backend choice ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
class TestBackend:
    """The iptables backend follows the kubelet's hint chain, like kube-proxy."""

    @pytest.mark.parametrize("backend", ["iptables-legacy", "iptables-nft"])
    def test_hint_chain_selects_backend(self, lab: Lab, backend: str) -> None:
        """A KUBE-IPTABLES-HINT chain in one backend's mangle table selects that backend."""
        lab.sh(lab.node, backend, "-w", "5", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
        assert netsetup.detect_iptables(lab.runner(lab.node))[0] == backend

    def test_canary_chain_selects_backend(self, lab: Lab) -> None:
        """The older KUBE-KUBELET-CANARY chain is a hint too."""
        lab.sh(lab.node, "iptables-legacy", "-w", "5", "-t", "mangle", "-N", "KUBE-KUBELET-CANARY")
        assert netsetup.detect_iptables(lab.runner(lab.node))[0] == "iptables-legacy"

    def test_no_hint_uses_system_iptables(self, lab: Lab) -> None:
        """Without a hint chain the system's iptables is used."""
        assert netsetup.detect_iptables(lab.runner(lab.node))[0] == "iptables"

    def test_legacy_hint_puts_rules_in_legacy_tables(self, lab: Lab) -> None:
        """With the hint in legacy, every rule lands in the legacy tables and none in nft."""
        lab.sh(lab.node, "iptables-legacy", "-w", "5", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
        interceptor = intercept(lab, "nodelocal")
        counts = (lab.count_rules("iptables-legacy-save"), lab.count_rules("iptables-nft-save"))
        assert counts == (len(interceptor.spec.rules()), 0)

    def test_legacy_rules_divert_and_tear_down(self, lab: Lab) -> None:
        """Legacy NOTRACK rules divert the pod's queries and their teardown falls back."""
        lab.sh(lab.node, "iptables-legacy", "-w", "5", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
        interceptor = intercept(lab, "nodelocal")
        before = lab.dig(CLUSTER_IP, "i.example")
        interceptor.teardown()
        assert (before, lab.dig(CLUSTER_IP, "i.example"), lab.tagged()) == (
            ANSWER_LOCAL,
            ANSWER_KUBE_DNS,
            [],
        )


# -- dnat mode --------------------------------------------------------------------------------


@pytest.mark.timeout(90)
class TestDnat:
    """dnat mode: nat PREROUTING/OUTPUT DNAT of the ClusterIP above kube-proxy's rules."""

    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_cluster_ip_redirected(self, lab: Lab, transport: str) -> None:
        """With the rules in place the pod's queries to the ClusterIP reach the local responder."""
        intercept(lab, "dnat")
        assert lookup(lab, transport, "j.example") == ANSWER_LOCAL

    def test_query_from_node_itself_redirected(self, lab: Lab) -> None:
        """The node's own queries (nat OUTPUT) are redirected too."""
        intercept(lab, "dnat")
        assert lab.dig(CLUSTER_IP, "k.example", ns=lab.node) == ANSWER_LOCAL

    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_falls_back_to_kube_dns_after_teardown(self, lab: Lab, transport: str) -> None:
        """After teardown the same lookups are answered by kube-dns through kube-proxy."""
        intercept(lab, "dnat").teardown()
        assert lookup(lab, transport, "l.example") == ANSWER_KUBE_DNS

    def test_nothing_tagged_left_after_teardown(self, lab: Lab) -> None:
        """Teardown leaves no rule or address of ours."""
        intercept(lab, "dnat").teardown()
        assert lab.tagged() == []

    def test_link_local_target_leaves_route_localnet_alone(self, lab: Lab) -> None:
        """A non-loopback target needs no route_localnet, so it stays 0."""
        intercept(lab, "dnat")
        assert lab.route_localnet() == "0"

    def test_loopback_target_enables_route_localnet(self, lab: Lab) -> None:
        """A 127.0.0.1 target sets route_localnet=1 and then answers the pod."""
        intercept(lab, "dnat", dnat_target="127.0.0.1:53")
        assert (lab.route_localnet(), lab.dig(CLUSTER_IP, "m.example")) == ("1", ANSWER_LOCAL)

    def test_teardown_restores_route_localnet(self, lab: Lab) -> None:
        """Teardown puts route_localnet back to its value before the install."""
        intercept(lab, "dnat", dnat_target="127.0.0.1:53").teardown()
        assert (lab.route_localnet(), lab.dig(CLUSTER_IP, "n.example")) == ("0", ANSWER_KUBE_DNS)

    def test_existing_udp_flow_redirected_after_install(self, lab: Lab) -> None:
        """A UDP flow seen before the install is redirected too: its conntrack entry is flushed."""
        before = lab.dig(CLUSTER_IP, "o.example", source_port=40000)
        intercept(lab, "dnat")
        after = lab.dig(CLUSTER_IP, "o.example", source_port=40000)
        assert (before, after) == (ANSWER_KUBE_DNS, ANSWER_LOCAL)

    def test_existing_udp_flow_falls_back_after_teardown(self, lab: Lab) -> None:
        """A UDP flow redirected to the proxy goes to kube-dns after teardown, same source port."""
        interceptor = intercept(lab, "dnat")
        before = lab.dig(CLUSTER_IP, "p.example", source_port=40001)
        interceptor.teardown()
        after = lab.dig(CLUSTER_IP, "p.example", source_port=40001)
        assert (before, after) == (ANSWER_LOCAL, ANSWER_KUBE_DNS)

    def test_sync_moves_rules_back_above_kube_services(self, lab: Lab) -> None:
        """When kube-proxy's jump is re-inserted above ours, sync puts ours back on top."""
        interceptor = intercept(lab, "dnat")
        lab.sh(lab.node, "iptables", "-w", "5", "-t", "nat", "-D", "PREROUTING", "-j", "KUBE-SERVICES")
        lab.sh(lab.node, "iptables", "-w", "5", "-t", "nat", "-I", "PREROUTING", "1", "-j", "KUBE-SERVICES")
        lab.sh(lab.node, "conntrack", "-F", check=False)
        hijacked = lab.dig(CLUSTER_IP, "q.example")
        moved = interceptor.sync()
        lab.sh(lab.node, "conntrack", "-F", check=False)
        assert (hijacked, len(moved), lab.dig(CLUSTER_IP, "q.example")) == (
            ANSWER_KUBE_DNS,
            2,
            ANSWER_LOCAL,
        )


# -- watchdog: unit level on loopback ---------------------------------------------------------


class _UdpServer:
    """A UDP server on 127.0.0.1:0 that answers with a reply built from each query."""

    def __init__(self, make_reply: Callable[[bytes], bytes | None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self._make_reply = make_reply
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = self._make_reply(data)
            if reply is not None:
                self.sock.sendto(reply, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def _nxdomain(data: bytes) -> bytes:
    reply = dnslib.DNSRecord.parse(data).reply()
    reply.header.rcode = dnslib.RCODE.NXDOMAIN
    return reply.pack()


@pytest.fixture
def answering() -> Iterator[_UdpServer]:
    """Provide a loopback server that answers every query with NXDOMAIN."""
    server = _UdpServer(_nxdomain)
    yield server
    server.close()


@pytest.fixture
def closed_port() -> tuple[str, int]:
    """Provide a loopback UDP address where nothing listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()


class _RecordingInterceptor:
    """Stands for netsetup.Interceptor: records teardowns, reports rules as told."""

    def __init__(self, rules: bool = True) -> None:
        self.rules = rules
        self.teardowns = 0

    def has_tagged_rules(self) -> bool:
        return self.rules

    def teardown(self) -> None:
        self.teardowns += 1
        self.rules = False


class TestWatchdogProbe:
    """The watchdog's hand-built query and its probe, against real loopback sockets."""

    def test_query_is_valid_dns(self) -> None:
        """The self-check query parses back (dnslib) with the qname, type A and RD."""
        parsed = dnslib.DNSRecord.parse(wire.self_query(4242, "probe.invalid."))
        assert (str(parsed.q.qname), parsed.q.qtype, parsed.header.rd, parsed.header.id) == (
            "probe.invalid.",
            dnslib.QTYPE.A,
            1,
            4242,
        )

    def test_too_long_label_rejected(self) -> None:
        """A label over 63 octets raises ValueError (RFC 1035 §2.3.4)."""
        with pytest.raises(ValueError, match="too long"):
            wire.self_query(1, "a" * 64 + ".invalid.")

    def test_answering_server_is_alive(self, answering: _UdpServer) -> None:
        """Any reply with our ID counts as alive, NXDOMAIN included."""
        assert watchdog.probe(answering.address, "x.invalid.", 0.5) is watchdog.Outcome.ANSWERED

    def test_closed_port_is_dead_at_once(self, closed_port: tuple[str, int]) -> None:
        """A closed port is refused on the ICMP error, well before the timeout."""
        started = time.monotonic()
        outcome = watchdog.probe(closed_port, "x.invalid.", 2.0)
        assert (outcome, time.monotonic() - started < 1.0) == (watchdog.Outcome.REFUSED, True)

    @pytest.mark.e2e  # a loopback UDP server
    def test_silent_server_is_dead_after_timeout(self) -> None:
        """A server that never answers fails after the timeout."""
        server = _UdpServer(lambda data: None)
        try:
            assert watchdog.probe(server.address, "x.invalid.", 0.2) is watchdog.Outcome.TIMEOUT
        finally:
            server.close()

    @pytest.mark.e2e  # a loopback UDP server
    def test_reply_with_other_id_ignored(self) -> None:
        """A reply whose ID is not ours does not count as alive."""

        def wrong_id(data: bytes) -> bytes:
            reply = dnslib.DNSRecord.parse(data).reply()
            reply.header.id = (reply.header.id + 1) % 0x10000
            return reply.pack()

        server = _UdpServer(wrong_id)
        try:
            assert watchdog.probe(server.address, "x.invalid.", 0.2) is watchdog.Outcome.TIMEOUT
        finally:
            server.close()


class TestWatchdogLoop:
    """The watchdog's arm / probe / tear down cycle."""

    @pytest.fixture(autouse=True)
    def _registry(self, tmp_path: Path) -> None:
        # An empty registry (no proxy registered there): every silent proxy counts as dead.
        self.registry = handover.InstanceRegistry(str(tmp_path), structlog.get_logger())

    def make(self, interceptor: _RecordingInterceptor, address: tuple[str, int]) -> Any:
        log = structlog.get_logger()
        return watchdog.Watchdog(interceptor, self.registry, address, log, failures=2, timeout=0.2)

    def test_stays_disarmed_without_rules(self, closed_port: tuple[str, int]) -> None:
        """Without the proxy's rules the watchdog neither probes nor tears down."""
        interceptor = _RecordingInterceptor(rules=False)
        dog = self.make(interceptor, closed_port)
        for _ in range(3):
            dog.step()
        assert (dog.armed, interceptor.teardowns) == (False, 0)

    def test_healthy_proxy_left_alone(self, answering: _UdpServer) -> None:
        """While the proxy answers, no number of rounds tears anything down."""
        interceptor = _RecordingInterceptor()
        dog = self.make(interceptor, answering.address)
        for _ in range(5):
            dog.step()
        assert (dog.armed, interceptor.teardowns) == (True, 0)

    def test_one_failure_is_not_enough(self, closed_port: tuple[str, int]) -> None:
        """A single failed probe below the threshold does not tear down."""
        interceptor = _RecordingInterceptor()
        dog = self.make(interceptor, closed_port)
        dog.step()  # arms
        dog.step()
        assert interceptor.teardowns == 0

    def test_tears_down_after_failures_in_a_row(self, closed_port: tuple[str, int]) -> None:
        """Two failed probes in a row tear the interception down once and disarm."""
        interceptor = _RecordingInterceptor()
        dog = self.make(interceptor, closed_port)
        for _ in range(5):
            dog.step()
        assert (interceptor.teardowns, dog.armed) == (1, False)

    def test_rearms_when_rules_come_back(self, closed_port: tuple[str, int]) -> None:
        """After a teardown, rules installed again re-arm it and a second failure tears down."""
        interceptor = _RecordingInterceptor()
        dog = self.make(interceptor, closed_port)
        for _ in range(3):
            dog.step()
        interceptor.rules = True
        for _ in range(3):
            dog.step()
        assert interceptor.teardowns == 2


# -- watchdog: kill -9 in the lab -------------------------------------------------------------


def start_watchdog(lab: Lab, probe: str, *extra: str) -> Any:
    """Start watchdog.py in the node namespace, on the proxies' registry, and wait until it is armed."""
    argv = [
        sys.executable,
        str(ROOT / "watchdog.py"),
        "--probe",
        probe,
        "--interval",
        "0.5",
        "--failures",
        "2",
        "--timeout",
        "0.3",
        "--state-dir",
        str(lab.workdir / "state"),  # start_proxy's
        *extra,
    ]
    return lab.start(lab.node, "watchdog", argv, "watchdog_armed")


def outage_after_kill(lab: Lab, victim: Any, server: str = CLUSTER_IP) -> float:
    """SIGKILL victim while the pod queries every 20 ms; return seconds until kube-dns answers."""
    return outages_after_kill(lab, victim, (server,))[server]


def outages_after_kill(lab: Lab, victim: Any, servers: tuple[str, ...]) -> dict[str, float]:
    """SIGKILL victim while the pod queries each server every 20 ms; return per server seconds to a kube-dns answer."""
    meters = {
        server: lab.start(
            lab.pod,
            "meter",
            [sys.executable, str(THIS), "measure", server, "outage.example", ANSWER_KUBE_DNS, "15"],
        )
        for server in servers
    }

    def samples(meter: Any) -> list[dict[str, Any]]:
        lines = meter.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    for server, meter in meters.items():
        wait_for(
            lambda meter=meter: sum(s["answer"] != ANSWER_KUBE_DNS for s in samples(meter)) >= 5,
            10,
            f"the pod is answered through the interception at {server}",
        )
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    outages = {}
    for server, meter in meters.items():
        meter.wait(timeout=20)
        back = [s["done"] for s in samples(meter) if s["sent"] > killed_at and s["answer"] == ANSWER_KUBE_DNS]
        assert back, f"no kube-dns answer at {server} after the kill: {samples(meter)[-3:]}"
        outages[server] = back[0] - killed_at
    return outages


@pytest.mark.timeout(90)
class TestWatchdogFallback:
    """kill -9 of the responder standing in for the proxy: the watchdog restores kube-dns."""

    @pytest.mark.parametrize("mode", ["nodelocal", "dnat"])
    def test_dns_back_within_goal_after_kill9(self, lab: Lab, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
        """After kill -9 the pod is without DNS for less than 2 s, then kube-dns answers."""
        stand_in = start_stand_in(lab, mode)
        interceptor = make_interceptor(lab, mode)
        interceptor.add_addresses()
        interceptor.install_rules()
        start_watchdog(lab, f"{LINK_LOCAL}:53")
        outage = outage_after_kill(lab, stand_in)
        with capsys.disabled():
            print(f"\n[{mode}] time without DNS after kill -9 (watchdog): {outage:.3f} s")
        assert outage < OUTAGE_GOAL

    def test_watchdog_removes_everything_tagged(self, lab: Lab) -> None:
        """The watchdog's teardown leaves no rule, address or interface of ours."""
        stand_in = start_stand_in(lab, "nodelocal")
        interceptor = make_interceptor(lab, "nodelocal")
        interceptor.add_addresses()
        interceptor.install_rules()
        dog = start_watchdog(lab, f"{LINK_LOCAL}:53")
        stand_in.send_signal(signal.SIGKILL)
        wait_for(lambda: "interception_removed" in dog.log_path.read_text(), 10, "the watchdog tore down")
        assert lab.tagged() == []

    def test_watchdog_rearms_after_restart(self, lab: Lab) -> None:
        """After the 'proxy' restarts and installs again, a second kill -9 falls back again."""
        first = start_stand_in(lab, "nodelocal")
        interceptor = make_interceptor(lab, "nodelocal")
        interceptor.add_addresses()
        interceptor.install_rules()
        dog = start_watchdog(lab, f"{LINK_LOCAL}:53")
        first.send_signal(signal.SIGKILL)
        wait_for(lambda: "interception_removed" in dog.log_path.read_text(), 10, "the first teardown")
        second = start_stand_in(lab, "nodelocal")
        restarted = make_interceptor(lab, "nodelocal")
        restarted.remove_leftovers()
        restarted.add_addresses()
        restarted.install_rules()
        wait_for(lambda: dog.log_path.read_text().count("watchdog_armed") == 2, 10, "re-armed")
        answered = lab.dig(CLUSTER_IP, "r.example")
        second.send_signal(signal.SIGKILL)
        wait_for(lambda: dog.log_path.read_text().count("interception_removed") == 2, 10, "the second teardown")
        assert (answered, lab.dig(CLUSTER_IP, "r.example")) == (ANSWER_LOCAL, ANSWER_KUBE_DNS)


# -- the real proxy (pass once proxy.py has --intercept; replaces the stand-in) ---------------


def proxy_argv(mode: str) -> list[str]:
    """Return the proxy command line the DaemonSet uses, with the lab's addresses."""
    argv = [sys.executable, str(ROOT / "proxy.py"), "--listen", f"{LINK_LOCAL}:53"]
    if mode == "nodelocal":
        argv += ["--listen", f"{CLUSTER_IP}:53"]
    return argv + [
        "--intercept",
        mode,
        "--local-ip",
        LINK_LOCAL,
        "--local-ip",
        CLUSTER_IP,
        "--upstream",
        f"{UPSTREAM_SERVICE_IP}:53",
        "--http",
        f"{LINK_LOCAL}:{HEALTH_PORT}",
        "--sync-interval",
        "1",
        "--log-queries",
        "--log-level",
        "debug",
    ]


def start_proxy(lab: Lab, mode: str, name: str = "proxy") -> Any:
    """Start proxy.py in the node namespace; wait until the pod is answered through it."""
    # The instance registry in the lab's directory, not the host's /run (handover.py).
    proxy = lab.start(lab.node, name, [*proxy_argv(mode), "--state-dir", str(lab.workdir / "state")])

    def answered() -> bool:
        if proxy.poll() is not None:
            raise AssertionError(f"proxy.py exited: {proxy.log_path.read_text()[-2000:]}")
        return lab.dig(CLUSTER_IP, "ready.example") == ANSWER_VIA_PROXY

    wait_for(answered, 15, f"the pod is answered through proxy.py ({proxy.log_path})")
    # Answers come a moment before the install ends; in dnat mode its last step flushes the
    # ClusterIP's UDP conntrack entries, which drops the reply of a query in flight then.
    wait_for(lambda: '"event": "serving"' in proxy.log_path.read_text(), 15, "proxy.py logs serving")
    return proxy


@pytest.mark.timeout(120)
class TestProxyEndToEnd:
    """proxy.py --intercept MODE in the node namespace (passes after the lead's integration)."""

    @pytest.mark.parametrize("mode", ["nodelocal", "dnat"])
    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_pod_lookups_go_through_the_proxy(self, lab: Lab, mode: str, transport: str) -> None:
        """The pod's lookups are answered through the proxy, which logs the query."""
        proxy = start_proxy(lab, mode)
        qname = f"{transport}-{mode}.example"
        answer = lookup(lab, transport, qname)
        assert (answer, qname in proxy.log_path.read_text()) == (ANSWER_VIA_PROXY, True)

    @pytest.mark.parametrize("mode", ["nodelocal", "dnat"])
    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_sigterm_falls_back_to_kube_dns(self, lab: Lab, mode: str, transport: str) -> None:
        """After SIGTERM the proxy exits 0 and kube-dns answers the same lookups."""
        proxy = start_proxy(lab, mode)
        proxy.send_signal(signal.SIGTERM)
        code = proxy.wait(timeout=10)
        assert (code, lookup(lab, transport, "s.example")) == (0, ANSWER_KUBE_DNS)

    @pytest.mark.parametrize("mode", ["nodelocal", "dnat"])
    def test_sigterm_leaves_nothing_tagged(self, lab: Lab, mode: str) -> None:
        """After SIGTERM no rule, address or interface of ours is left."""
        proxy = start_proxy(lab, mode)
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=10)
        assert lab.tagged() == []

    @pytest.mark.parametrize("mode", ["nodelocal", "dnat"])
    def test_kill9_with_watchdog_outage_under_goal(
        self, lab: Lab, mode: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """After kill -9 of proxy.py the watchdog brings kube-dns back in under 2 s."""
        proxy = start_proxy(lab, mode)
        start_watchdog(lab, f"{LINK_LOCAL}:53")
        outage = outage_after_kill(lab, proxy)
        with capsys.disabled():
            print(f"\n[{mode}] proxy.py: time without DNS after kill -9 (watchdog): {outage:.3f} s")
        assert outage < OUTAGE_GOAL

    @pytest.mark.parametrize("mode", ["nodelocal", "dnat"])
    def test_restart_after_kill9_removes_leftovers_first(self, lab: Lab, mode: str) -> None:
        """A restarted proxy removes the leftovers before installing: no duplicate rule."""
        first = start_proxy(lab, mode, "proxy-1")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=5)
        second = start_proxy(lab, mode, "proxy-2")
        # The rules divert traffic a moment before the install is logged.
        wait_for(lambda: "intercept_rules_installed" in second.log_path.read_text(), 5, "installed")
        events = [
            json.loads(line).get("event") for line in second.log_path.read_text().splitlines() if line.startswith("{")
        ]
        spec = netsetup.InterceptSpec(
            mode=mode, local_ips=(LINK_LOCAL, CLUSTER_IP), health_port=HEALTH_PORT if mode == "nodelocal" else None
        )
        removed_first = events.index("intercept_leftovers_removed") < events.index("intercept_rules_installed")
        assert (removed_first, lab.count_rules()) == (True, len(spec.rules()))


if __name__ == "__main__":
    if sys.argv[1] == "respond":
        respond(sys.argv[2:])
    elif sys.argv[1] == "measure":
        measure(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}: respond | measure")
