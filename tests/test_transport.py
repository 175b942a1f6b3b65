"""Pooled UDP sockets and reused TCP connections to one upstream, against real sockets on loopback.

The server side is a scripted stdlib server in a thread: it collects queries, then answers them in
the order the test says (out of order, twice, with another ID or question, not at all, or closes
the connection midway). The client side is transport.UdpPool / TcpPool in the test's gevent loop.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import dnslib
import gevent
import pytest

import transport
import wire
from transport import TcpPool, UdpPool, UpstreamError

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"


def question(name: str) -> bytes:
    return wire.name_to_wire(name) + struct.pack("!HH", 1, 1)


def reply_to(query: bytes, address: str = "192.0.2.1", qid: int | None = None, qname: str | None = None) -> bytes:
    """An A answer to a query (wire), optionally with another ID or question."""
    request = dnslib.DNSRecord.parse(query)
    if qname is not None:
        request.q.qname = dnslib.DNSLabel(qname)
    answer = request.reply()
    answer.add_answer(dnslib.RR(request.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(address), ttl=30))
    if qid is not None:
        answer.header.id = qid
    return answer.pack()


def address_of(reply: bytes) -> str:
    return str(dnslib.DNSRecord.parse(reply).rr[0].rdata)


class ScriptedUdp:
    """A UDP server that gathers `batch` queries, then calls `respond(sock, queries)` once per batch."""

    def __init__(self, batch: int, respond: Callable[[socket.socket, list[tuple[bytes, tuple]]], None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.batch = batch
        self.respond = respond
        self.sources: list[tuple] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pending: list[tuple[bytes, tuple]] = []
        while not self.stopping.is_set():
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.sources.append(source)
            pending.append((data, source))
            if len(pending) >= self.batch:
                self.respond(self.sock, pending)
                pending = []

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def scripted_udp() -> Iterator[Callable[..., ScriptedUdp]]:
    servers: list[ScriptedUdp] = []

    def start(batch: int, respond: Callable[[socket.socket, list[tuple[bytes, tuple]]], None]) -> ScriptedUdp:
        servers.append(ScriptedUdp(batch, respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def ask_all(pool: UdpPool | TcpPool, names: list[str], timeout: float = 2.0) -> list[bytes | str]:
    """Ask every name at once from its own greenlet; each reply, or the UpstreamError reason."""

    def ask(name: str) -> bytes | str:
        try:
            return pool.exchange(wire.build_upstream_query(0, question(name), False, False), question(name), timeout)
        except UpstreamError as exc:
            return exc.reason

    greenlets = [gevent.spawn(ask, name) for name in names]
    gevent.joinall(greenlets, timeout=timeout + 2, raise_error=True)
    return [greenlet.value for greenlet in greenlets]


class TestUdpPool:
    """Long-lived UDP sockets: replies matched by ID and question, spoofs dropped and counted."""

    def test_interleaved_replies_reach_their_queries(self, scripted_udp):
        """Twelve queries answered in reverse order, each with its own address, each reach the query they answer."""

        def reverse(sock, queries):
            for index, (data, source) in reversed(list(enumerate(queries))):
                sock.sendto(reply_to(data, address=f"192.0.2.{index + 1}"), source)

        server = scripted_udp(12, reverse)
        dropped: list[str] = []
        pool = UdpPool((HOST, server.port), socket.AF_INET, dropped.append)
        names = [f"n{i}.example." for i in range(12)]
        replies = ask_all(pool, names)
        for name, reply in zip(names, replies, strict=True):
            assert isinstance(reply, bytes)
            assert dnslib.DNSRecord.parse(reply).q.qname == dnslib.DNSLabel(name)
        assert dropped == []
        assert len({source[1] for source in server.sources}) == transport.UDP_POOL_SIZE
        pool.close()

    @pytest.mark.parametrize("spoof", ["id", "question"])
    def test_spoofed_reply_never_used_and_counted(self, scripted_udp, spoof):
        """A reply with another ID or another question comes first; it is dropped and counted, the real one used."""

        def spoofed_first(sock, queries):
            data, source = queries[0]
            qid = struct.unpack("!H", data[:2])[0]
            if spoof == "id":
                sock.sendto(reply_to(data, address="203.0.113.66", qid=qid ^ 0x5A5A), source)
            else:
                sock.sendto(reply_to(data, address="203.0.113.66", qname="evil.example."), source)
            sock.sendto(reply_to(data), source)

        server = scripted_udp(1, spoofed_first)
        dropped: list[str] = []
        pool = UdpPool((HOST, server.port), socket.AF_INET, dropped.append, size=1)
        [reply] = ask_all(pool, ["victim.example."])
        assert isinstance(reply, bytes) and address_of(reply) == "192.0.2.1"
        assert dropped == [spoof]
        pool.close()

    def test_reply_from_another_port_never_used(self, scripted_udp):
        """A datagram from another source port to the pool's socket never answers a query (RFC 5452 §9.1)."""
        intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        intruder.bind((HOST, 0))

        def from_elsewhere(sock, queries):
            data, source = queries[0]
            intruder.sendto(reply_to(data, address="203.0.113.66"), source)  # same ID and question

        server = scripted_udp(1, from_elsewhere)
        pool = UdpPool((HOST, server.port), socket.AF_INET, lambda reason: None, size=1)
        [reply] = ask_all(pool, ["victim.example."], timeout=0.5)
        assert reply == "timeout"
        intruder.close()
        pool.close()

    def test_sockets_retired_after_max_queries(self, scripted_udp):
        """After max_queries, a socket is replaced by one on a new source port; the pool stays bounded."""

        def echo(sock, queries):
            for data, source in queries:
                sock.sendto(reply_to(data), source)

        server = scripted_udp(1, echo)
        pool = UdpPool((HOST, server.port), socket.AF_INET, lambda reason: None, size=2, max_queries=3)
        for index in range(12):
            ask_all(pool, [f"r{index}.example."])
        ports = [source[1] for source in server.sources]
        assert len(set(ports)) == 4  # 12 queries, 2 sockets, 3 queries each: 4 sockets in all
        assert pool.opened == 4 and sum(sock is not None for sock in pool.sockets) == 2
        pool.close()

    def test_ids_never_twice_in_flight_on_one_socket(self, scripted_udp):
        """Hundreds of queries in flight on one socket all carry distinct IDs."""

        def answer_all(sock, queries):
            for data, source in queries:
                sock.sendto(reply_to(data), source)

        server = scripted_udp(300, answer_all)
        pool = UdpPool((HOST, server.port), socket.AF_INET, lambda reason: None, size=1)
        replies = ask_all(pool, [f"m{i}.example." for i in range(300)], timeout=5)
        assert all(isinstance(reply, bytes) for reply in replies)
        assert len({reply[:2] for reply in replies if isinstance(reply, bytes)}) == 300
        pool.close()

    def test_port_unreachable_fails_at_once(self):
        """With nothing on the server's port, the ICMP error fails the query at once, not after the timeout."""
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind((HOST, 0))
        port = closed.getsockname()[1]
        closed.close()
        pool = UdpPool((HOST, port), socket.AF_INET, lambda reason: None, size=1)
        [reply] = ask_all(pool, ["gone.example."], timeout=5)
        assert reply == "connection_refused"
        pool.close()


class ScriptedTcp:
    """A TCP server: per connection, `serve(conn)` runs in a thread; counts connections."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.serve = serve
        self.connections = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(3)
            self.serve(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(2)
        self.sock.close()


def read_query(conn: socket.socket) -> bytes | None:
    header = b""
    while len(header) < 2:
        chunk = conn.recv(2 - len(header))
        if not chunk:
            return None
        header += chunk
    length = struct.unpack("!H", header)[0]
    data = b""
    while len(data) < length:
        chunk = conn.recv(length - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def send_framed(conn: socket.socket, message: bytes) -> None:
    conn.sendall(struct.pack("!H", len(message)) + message)


@pytest.fixture
def scripted_tcp() -> Iterator[Callable[..., ScriptedTcp]]:
    servers: list[ScriptedTcp] = []

    def start(serve: Callable[[socket.socket], None]) -> ScriptedTcp:
        servers.append(ScriptedTcp(serve))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class TestTcpPool:
    """Reused, pipelined TCP: answers out of order by ID, a closed connection replaced."""

    def test_pipelined_queries_answered_out_of_order_on_one_connection(self, scripted_tcp):
        """Three queries pipelined on one connection, answered 3-1-2, each reach their query."""

        def out_of_order(conn):
            queries = [read_query(conn) for _ in range(3)]
            for index in (2, 0, 1):
                send_framed(conn, reply_to(queries[index], address=f"192.0.2.{index + 1}"))
            while read_query(conn) is not None:
                pass

        server = scripted_tcp(out_of_order)
        pool = TcpPool((HOST, server.port), socket.AF_INET, lambda reason: None)
        replies = ask_all(pool, ["a.example.", "b.example.", "c.example."])
        assert [address_of(reply) for reply in replies] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
        assert server.connections == 1
        pool.close()

    def test_connection_reused_across_queries(self, scripted_tcp):
        """Queries one after the other share one open connection."""

        def echo(conn):
            while (data := read_query(conn)) is not None:
                send_framed(conn, reply_to(data))

        server = scripted_tcp(echo)
        pool = TcpPool((HOST, server.port), socket.AF_INET, lambda reason: None)
        for index in range(5):
            [reply] = ask_all(pool, [f"s{index}.example."])
            assert isinstance(reply, bytes)
        assert server.connections == 1 and pool.opened == 1
        pool.close()

    def test_server_close_mid_stream_reconnects(self, scripted_tcp):
        """The server answers one query, then closes with the next unanswered: the query is sent again on a
        new connection and answered."""
        served: list[int] = []

        def one_then_close(conn):
            served.append(1)
            data = read_query(conn)
            send_framed(conn, reply_to(data))
            if len(served) == 1:
                read_query(conn)  # the second query arrives, then the server goes away
                return
            while (data := read_query(conn)) is not None:
                send_framed(conn, reply_to(data))

        server = scripted_tcp(one_then_close)
        pool = TcpPool((HOST, server.port), socket.AF_INET, lambda reason: None)
        first = ask_all(pool, ["first.example."])[0]
        second = ask_all(pool, ["second.example."])[0]
        assert isinstance(first, bytes) and isinstance(second, bytes)
        assert address_of(second) == "192.0.2.1" and server.connections == 2
        pool.close()

    def test_reply_with_wrong_id_dropped_and_counted(self, scripted_tcp):
        """Over TCP too, an answer with an ID not in flight is dropped and counted."""

        def wrong_then_right(conn):
            data = read_query(conn)
            qid = struct.unpack("!H", data[:2])[0]
            send_framed(conn, reply_to(data, address="203.0.113.66", qid=qid ^ 1))
            send_framed(conn, reply_to(data))
            while read_query(conn) is not None:
                pass

        server = scripted_tcp(wrong_then_right)
        dropped: list[str] = []
        pool = TcpPool((HOST, server.port), socket.AF_INET, dropped.append)
        [reply] = ask_all(pool, ["t.example."])
        assert isinstance(reply, bytes) and address_of(reply) == "192.0.2.1"
        assert dropped == ["id"]
        pool.close()

    def test_idle_connection_closed(self, scripted_tcp):
        """A connection with nothing in flight for idle_close seconds is closed by us."""

        def echo(conn):
            while (data := read_query(conn)) is not None:
                send_framed(conn, reply_to(data))

        server = scripted_tcp(echo)
        pool = TcpPool((HOST, server.port), socket.AF_INET, lambda reason: None, idle_close=0.2)
        ask_all(pool, ["idle.example."])
        assert len(pool.connections) == 1
        gevent.sleep(0.5)  # the reader's idle timeout, a real socket timeout
        assert pool.connections == []
        pool.close()
