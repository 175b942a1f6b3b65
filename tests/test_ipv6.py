"""IPv6: the proxy serves on [::1] and forwards to upstreams on ::1, UDP and TCP, with its access list."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

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
