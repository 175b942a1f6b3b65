"""Migrating from NodeLocal DNSCache on one node (README), in network namespaces.

The lab of test_netsetup.py (pod -> node -> kube-dns, kube-proxy stand-in) with a stand-in
node-cache on the node: the interface ``nodelocaldns`` holding the link-local address and the
ClusterIP (a veth: the dummy driver may be missing), node-cache's 12 rules per address with its
comments (cmd/node-cache/app/cache_app.go), and a responder bound like CoreDNS, with SO_REUSEPORT,
answering 169.254.0.4.  The real proxy.py and watchdog.py start next to it, as the DaemonSet does.
node-cache's exit is replayed in both orders of its teardown: the interface first (node-cache
before kubernetes/dns PR #690), or the rules first (after), then the responder dies.

A pod queries the ClusterIP and the link-local address every 20 ms throughout.  With the README's
step 3 (a copy of each address on lo, labelled as the proxy's own) no query fails but those the
dying responder had already received; without it, queries fail until the watchdog and the proxy's
next sync act.

Run as a script, this file is the stand-in CoreDNS (``respond``), started with ``ip netns exec``.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import test_netsetup
from test_netsetup import (
    ANSWER_KUBE_DNS,
    ANSWER_VIA_PROXY,
    CLUSTER_IP,
    LINK_LOCAL,
    Lab,
    _serve_tcp,
    _serve_udp,
    proxy_argv,
    start_watchdog,
    wait_for,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

THIS = Path(__file__).resolve()
ANSWER_NODELOCAL = "169.254.0.4"
ADDRESSES = (LINK_LOCAL, CLUSTER_IP)
# What README step 3 puts on lo: the label netsetup gives the proxy's own addresses on lo.
COPY_LABEL = "lo:kube-dns-pro"
# The manifest's --sync-interval: how long a lost address stays lost without step 3.
SYNC_INTERVAL = "60"


def respond(addresses: list[str]) -> None:
    """Answer A queries with ANSWER_NODELOCAL on ADDRESS:53, UDP and TCP, bound like CoreDNS (SO_REUSEPORT)."""
    for address in addresses:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        for sock in (udp, tcp):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address, 53))
        tcp.listen(16)
        threading.Thread(target=_serve_udp, args=(udp, ANSWER_NODELOCAL), daemon=True).start()
        threading.Thread(target=_serve_tcp, args=(tcp, ANSWER_NODELOCAL), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def node_cache_rules(ip: str) -> list[tuple[str, str, list[str]]]:
    """Return node-cache's rules for one address: (table, chain, arguments with its comment)."""
    skip, allow = "NodeLocal DNS Cache: skip conntrack", "NodeLocal DNS Cache: allow DNS traffic"
    rules = []
    for proto in ("tcp", "udp"):
        to_us = ["-p", proto, "-d", ip, "--dport", "53"]
        from_us = ["-p", proto, "-s", ip, "--sport", "53"]
        rules += [
            ("raw", "PREROUTING", [*to_us, "-m", "comment", "--comment", skip, "-j", "NOTRACK"]),
            ("filter", "INPUT", [*to_us, "-m", "comment", "--comment", allow, "-j", "ACCEPT"]),
            ("raw", "OUTPUT", [*from_us, "-m", "comment", "--comment", skip, "-j", "NOTRACK"]),
            ("filter", "OUTPUT", [*from_us, "-m", "comment", "--comment", allow, "-j", "ACCEPT"]),
            ("raw", "OUTPUT", [*to_us, "-m", "comment", "--comment", skip, "-j", "NOTRACK"]),
        ]
    for match in (["-d", ip, "--dport", "8080"], ["-s", ip, "--sport", "8080"]):
        rules.append(("raw", "OUTPUT", ["-p", "tcp", *match, "-m", "comment", "--comment", skip, "-j", "NOTRACK"]))
    return rules


class Node:
    """The lab's node running NodeLocal DNSCache's stand-in, then the proxy next to it."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.rules = [rule for ip in ADDRESSES for rule in node_cache_rules(ip)]
        self.node_cache: Any = None
        self.proxy: Any = None
        self.meters: dict[str, Any] = {}

    def iptables(self, op: str, table: str, chain: str, args: list[str]) -> None:
        position = ["1"] if op == "-I" else []
        self.lab.sh(self.lab.node, "iptables", "-w", "5", "-t", table, op, chain, *position, *args)

    def start_node_cache(self) -> None:
        """node-cache's order: interface and addresses, CoreDNS bound, then the rules."""
        node = self.lab.node
        self.lab.sh(node, "ip", "link", "add", "nodelocaldns", "type", "veth", "peer", "name", "nodelocalpeer")
        self.lab.sh(node, "ip", "link", "set", "nodelocaldns", "up")
        for ip in ADDRESSES:
            self.lab.sh(node, "ip", "addr", "add", f"{ip}/32", "dev", "nodelocaldns")
        self.node_cache = self.lab.start(
            node, "node-cache", [sys.executable, str(THIS), "respond", *ADDRESSES], "ready"
        )
        for rule in self.rules:
            self.iptables("-I", *rule)

    def start_meters(self) -> None:
        """Query each address from the pod every 20 ms (test_netsetup's meter), for up to 60 s."""
        for ip in ADDRESSES:
            argv = [sys.executable, str(test_netsetup.THIS), "measure", ip, "m.example", "never", "60"]
            self.meters[ip] = self.lab.start(self.lab.pod, f"meter-{ip}", argv)

    def start_proxy(self) -> None:
        """proxy.py and watchdog.py as the DaemonSet runs them, next to node-cache; wait until both answer."""
        argv = proxy_argv("nodelocal") + ["--state-dir", str(self.lab.workdir / "state")]
        argv[argv.index("--sync-interval") + 1] = SYNC_INTERVAL
        self.proxy = self.lab.start(self.lab.node, "proxy", argv)
        log = self.proxy.log_path
        wait_for(lambda: '"serving"' in log.read_text(), 15, "proxy.py serves")
        start_watchdog(self.lab, f"{LINK_LOCAL}:53", "--stall-window", "3")  # the manifest's
        wait_for(lambda: {ANSWER_NODELOCAL, ANSWER_VIA_PROXY} <= self.answers(), 10, "both caches answer")

    def copy_addresses_to_lo(self) -> None:
        """README step 3."""
        for ip in ADDRESSES:
            self.lab.sh(self.lab.node, "ip", "addr", "add", f"{ip}/32", "dev", "lo", "label", COPY_LABEL)

    def stop_node_cache(self, order: str) -> float:
        """node-cache's SIGTERM: its teardown in ``order``, then the process ends; return when it died."""
        if order == "interface-first":
            self.lab.sh(self.lab.node, "ip", "link", "del", "nodelocaldns")
        for rule in self.rules:
            self.iptables("-D", *rule)
        if order == "rules-first":
            self.lab.sh(self.lab.node, "ip", "link", "del", "nodelocaldns")
        died = time.monotonic()
        self.node_cache.send_signal(signal.SIGKILL)
        self.node_cache.wait(timeout=5)
        return died

    def samples(self, ip: str) -> list[dict[str, Any]]:
        lines = self.meters[ip].log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def answers(self, since: float = 0.0) -> set[str]:
        return {s["answer"] for ip in ADDRESSES for s in self.samples(ip) if s["sent"] >= since}

    def failures(self, ip: str, since: float) -> list[float]:
        """Return when the failed queries to ``ip`` sent after ``since`` were sent."""
        return [s["sent"] for s in self.samples(ip) if s["sent"] >= since and s["answer"].startswith("error")]

    def own_copies(self) -> list[str]:
        out = self.lab.sh(self.lab.node, "ip", "-4", "-o", "addr", "show", "dev", "lo", "label", COPY_LABEL).stdout
        return [line.split()[3] for line in out.splitlines()]


@pytest.fixture
def nodelocal_node(tmp_path: Path) -> Iterator[Node]:
    """A fresh lab whose node runs NodeLocal's stand-in, the pod querying; deleted afterwards."""
    lab = Lab(tmp_path)
    try:
        lab.setup()
        the_node = Node(lab)
        the_node.start_node_cache()
        the_node.start_meters()
        yield the_node
    finally:
        lab.close()


@pytest.mark.parametrize("order", ["interface-first", "rules-first"])
def test_switch_with_copies_loses_only_what_node_cache_held(nodelocal_node: Node, order: str) -> None:
    """Steps 2, 3 and 5: every query is answered but those the dying node-cache had already received."""
    node = nodelocal_node
    node.start_proxy()
    node.copy_addresses_to_lo()
    start = time.monotonic()
    died = node.stop_node_cache(order)
    time.sleep(3.0)
    late = {ip: [t for t in node.failures(ip, start) if not died - 0.3 <= t <= died + 0.3] for ip in ADDRESSES}
    held = sum(len(node.failures(ip, start)) for ip in ADDRESSES) - sum(map(len, late.values()))
    after = node.answers(since=died + 0.3)
    assert (late, held <= 4, after) == ({ip: [] for ip in ADDRESSES}, True, {ANSWER_VIA_PROXY})


def test_switch_without_copies_has_a_gap_until_the_repair(nodelocal_node: Node) -> None:
    """Without step 3 node-cache's exit takes the addresses: queries fail until the proxy's drift repair
    (a look every second) puts them back, then the proxy answers both addresses again."""
    node = nodelocal_node
    node.start_proxy()
    died = node.stop_node_cache("rules-first")
    time.sleep(4.0)
    failed = sorted(t for ip in ADDRESSES for t in node.failures(ip, died + 0.3))
    gap = failed[-1] - died if failed else 0.0
    after = node.answers(since=died + 3.0)
    print(f"\n[without step 3] {len(failed)} failed queries, the last {gap:.2f} s after node-cache's exit")
    assert (bool(failed), gap < 3.0, after) == (True, True, {ANSWER_VIA_PROXY})


def test_rollback_before_removing_node_cache(nodelocal_node: Node) -> None:
    """Removing the proxy after step 3 (kubectl delete) leaves node-cache answering, with its addresses."""
    node = nodelocal_node
    node.start_proxy()
    node.copy_addresses_to_lo()
    start = time.monotonic()
    node.proxy.send_signal(signal.SIGTERM)
    code = node.proxy.wait(timeout=15)
    time.sleep(1.0)
    lost = {ip: node.failures(ip, start) for ip in ADDRESSES}
    on_interface = node.lab.sh(node.lab.node, "ip", "-4", "-o", "addr", "show", "dev", "nodelocaldns").stdout
    assert (code, lost, node.answers(since=time.monotonic() - 0.5), node.own_copies()) == (
        0,
        {ip: [] for ip in ADDRESSES},
        {ANSWER_NODELOCAL},
        [],
    )
    assert all(f"{ip}/32" in on_interface for ip in ADDRESSES)


def test_proxy_exit_after_the_switch_removes_the_copies(nodelocal_node: Node) -> None:
    """After the switch the copies are the proxy's own: its last exit removes them, kube-dns answers."""
    node = nodelocal_node
    node.start_proxy()
    node.copy_addresses_to_lo()
    node.stop_node_cache("rules-first")
    node.proxy.send_signal(signal.SIGTERM)
    code = node.proxy.wait(timeout=15)
    assert (code, node.own_copies(), node.lab.dig(CLUSTER_IP, "after.example")) == (0, [], ANSWER_KUBE_DNS)


if __name__ == "__main__":
    if sys.argv[1] == "respond":
        respond(sys.argv[2:])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}: respond")
