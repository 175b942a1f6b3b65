"""Conntrack on a node: the proxy's upstream traffic costs a bounded number of entries, not one per miss.

NodeLocal DNSCache exists partly to take DNS out of conntrack; a proxy that opened a socket per
upstream query would put one entry per cache miss back (kube-proxy's DNAT in front of kube-dns).
"""

from __future__ import annotations

import sys

import pytest

import transport
from test_netsetup import CLUSTER_IP, UPSTREAM_SERVICE_IP, Lab, start_proxy
from test_netsetup import lab as lab  # noqa: F401  (the node lab fixture)

pytestmark = pytest.mark.netns

MISSES = 1000
PROBE_SCRIPT = """
import socket, sys, dnslib
answered = 0
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(2)
    sock.connect((sys.argv[1], 53))
    for index in range(int(sys.argv[2])):
        sock.send(dnslib.DNSRecord.question(f"miss-{index}.example", "A").pack())
        try:
            sock.recv(4096)
            answered += 1
        except OSError:
            pass
print(answered)
"""


def test_conntrack_entries_toward_kube_dns_bounded_by_the_pool(lab: Lab) -> None:
    """In a node lab (kube-proxy's DNAT in front of kube-dns), 1,000 cache misses create at most as many
    conntrack entries toward kube-dns as the UDP pool has sockets."""
    start_proxy(lab, "nodelocal")

    def entries_toward_kube_dns() -> int:
        listed = lab.sh(lab.node, "conntrack", "-L", "-p", "udp", "--orig-dst", UPSTREAM_SERVICE_IP, check=False)
        return sum(1 for line in listed.stdout.splitlines() if line.startswith("udp"))

    before = entries_toward_kube_dns()
    pod = lab.sh(lab.pod, sys.executable, "-c", PROBE_SCRIPT, CLUSTER_IP, str(MISSES), timeout=120)
    after = entries_toward_kube_dns()
    answered = int(pod.stdout.strip())
    print(
        f"\n[conntrack] {MISSES} misses from the pod ({answered} answered): "
        f"{after - before} new conntrack entries toward kube-dns ({before} before, {after} after); "
        f"UDP pool size {transport.UDP_POOL_SIZE}"
    )
    assert answered == MISSES
    assert after - before <= transport.UDP_POOL_SIZE
