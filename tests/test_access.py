"""Not an open resolver: --allow (repeatable, KUBE_DNS_PROXY_ALLOW) decides who may query; others get REFUSED."""

# "Others" are tested from this machine by allowing only 127.0.0.2/32 and querying from a client
# socket bound to 127.0.0.1 (refused) or 127.0.0.2 (answered): both are loopback addresses.

from __future__ import annotations

import ipaddress
import subprocess
import sys

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

import config
from conftest import REPO_ROOT, query
from servers import free_port

ONLY_127_0_0_2 = ("--allow", "127.0.0.2/32")
DEFAULT_NETWORKS = {
    "127.0.0.0/8",
    "::1/128",
    "169.254.0.0/16",
    "fe80::/10",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
    "100.64.0.0/10",
}


def ask(proxy, qname: str, source: str, tcp: bool = False) -> dns.message.Message:
    """One query to the proxy from a chosen loopback source address."""
    message = dns.message.make_query(qname, "A")
    if tcp:
        return dns.query.tcp(message, "127.0.0.1", port=proxy.port, timeout=3.0, source=source)
    return dns.query.udp(message, "127.0.0.1", port=proxy.port, timeout=3.0, source=source)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_default_allows_loopback(fake_upstream, proxy_factory, tcp):
    """Without --allow, clients on 127.0.0.1 and 127.0.0.2 (loopback, 127.0.0.0/8) are answered."""
    proxy = proxy_factory("--upstream", fake_upstream.address)
    for source in ("127.0.0.1", "127.0.0.2"):
        assert ask(proxy, "svc.default.svc.cluster.local", source, tcp).rcode() == dns.rcode.NOERROR


def test_default_allows_ipv6_loopback(fake_upstream, proxy_factory):
    """Without --allow, a client on ::1 is answered."""
    port = free_port()
    proxy_factory("--upstream", fake_upstream.address, "--listen", f"[::1]:{port}")
    assert query(f"[::1]:{port}", "svc.default.svc.cluster.local").rcode() == dns.rcode.NOERROR


def test_default_networks():
    """The default list is loopback, link-local, private and shared address space, IPv4 and IPv6."""
    built = config.build_config(["--listen", "127.0.0.1:5300", "--upstream", "127.0.0.1:5301"], environ={})
    assert {str(network) for network in built.allow} == DEFAULT_NETWORKS
    public = ipaddress.ip_address("8.8.8.8")  # compared only, never contacted
    assert not any(public in network for network in built.allow if network.version == 4)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_client_outside_allow_gets_refused(fake_upstream, proxy_factory, tcp):
    """A client outside --allow gets REFUSED (rcode 5) with its ID, and nothing is forwarded for it."""
    proxy = proxy_factory("--upstream", fake_upstream.address, *ONLY_127_0_0_2)
    message = dns.message.make_query("refused.default.svc.cluster.local", "A")
    send = dns.query.tcp if tcp else dns.query.udp
    reply = send(message, "127.0.0.1", port=proxy.port, timeout=3.0, source="127.0.0.1")
    assert reply.rcode() == dns.rcode.REFUSED
    assert reply.id == message.id and not reply.answer
    assert fake_upstream.count("refused.default.svc.cluster.local") == 0


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_client_inside_allow_answered(fake_upstream, proxy_factory, tcp):
    """A client inside --allow is answered normally."""
    proxy = proxy_factory("--upstream", fake_upstream.address, *ONLY_127_0_0_2)
    reply = ask(proxy, "svc.default.svc.cluster.local", "127.0.0.2", tcp)
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer


def test_cached_answer_not_given_to_refused_client(fake_upstream, proxy_factory):
    """A name cached for an allowed client is still REFUSED to a client outside --allow (no cache-hit bypass)."""
    proxy = proxy_factory("--upstream", fake_upstream.address, *ONLY_127_0_0_2)
    assert ask(proxy, "svc.default.svc.cluster.local", "127.0.0.2").rcode() == dns.rcode.NOERROR
    assert ask(proxy, "svc.default.svc.cluster.local", "127.0.0.1").rcode() == dns.rcode.REFUSED
    assert ask(proxy, "svc.default.svc.cluster.local", "127.0.0.1", tcp=True).rcode() == dns.rcode.REFUSED


def test_allow_is_repeatable(fake_upstream, proxy_factory):
    """Every --allow network is allowed; addresses in none of them are refused."""
    proxy = proxy_factory("--upstream", fake_upstream.address, *ONLY_127_0_0_2, "--allow", "127.0.0.3/32")
    assert ask(proxy, "svc.default.svc.cluster.local", "127.0.0.2").rcode() == dns.rcode.NOERROR
    assert ask(proxy, "svc.default.svc.cluster.local", "127.0.0.3").rcode() == dns.rcode.NOERROR
    assert ask(proxy, "svc.default.svc.cluster.local", "127.0.0.1").rcode() == dns.rcode.REFUSED


def test_allow_from_environment(fake_upstream, proxy_factory):
    """KUBE_DNS_PROXY_ALLOW takes a comma-separated list of networks, like the flag."""
    proxy = proxy_factory(
        "--upstream", fake_upstream.address, env={"KUBE_DNS_PROXY_ALLOW": "127.0.0.2/32,127.0.0.3/32"}
    )
    assert ask(proxy, "svc.default.svc.cluster.local", "127.0.0.3").rcode() == dns.rcode.NOERROR
    assert ask(proxy, "svc.default.svc.cluster.local", "127.0.0.1").rcode() == dns.rcode.REFUSED


def test_allow_replaces_default(fake_upstream, proxy_factory):
    """Given --allow, the default list no longer applies: loopback outside it is refused."""
    proxy = proxy_factory("--upstream", fake_upstream.address, "--allow", "10.0.0.0/8")
    assert ask(proxy, "svc.default.svc.cluster.local", "127.0.0.1").rcode() == dns.rcode.REFUSED


def test_refused_client_junk_gets_no_answer(fake_upstream, proxy_factory):
    """A QR=1 packet from a client outside --allow is dropped like any other, not answered REFUSED (no reflection)."""
    proxy = proxy_factory("--upstream", fake_upstream.address, *ONLY_127_0_0_2)
    reply = dns.message.make_response(dns.message.make_query("x.test", "A"))
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(reply, "127.0.0.1", port=proxy.port, timeout=0.5, source="127.0.0.1", ignore_unexpected=True)


def test_bad_network_is_a_usage_error(fake_upstream):
    """A value that is not a network prints one `proxy.py: error:` line naming it and exits with code 2."""
    result = subprocess.run(
        [sys.executable, "proxy.py", "--listen", f"127.0.0.1:{free_port()}", "--upstream", fake_upstream.address]
        + ["--allow", "not-a-network"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proxy.py: error:") and "not-a-network" in lines[0]
