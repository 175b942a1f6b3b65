"""Real DNS servers on 127.0.0.1 for the tests: Knot (authoritative) and a scriptable upstream."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import selectors
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import dns.exception
import dns.message
import dns.query
import dnslib

HOST = "127.0.0.1"

# Ports handed out in this process; a FakeUpstream in "down" mode has closed its sockets but
# will rebind the same port, so free_port() must never hand that port to anyone else.
_issued_ports: set[int] = set()
_issued_lock = threading.Lock()


def free_port() -> int:
    """Return a port on 127.0.0.1 that is free for both UDP and TCP and not handed out before."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
        with _issued_lock:
            if port in _issued_ports:
                continue
            _issued_ports.add(port)
        return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


def qtype_name(qtype: int) -> str:
    """Return the mnemonic of a qtype ("A", "AAAA"), or "TYPEnnn" (RFC 3597) when unknown."""
    name = dnslib.QTYPE.get(qtype)
    return name if isinstance(name, str) else f"TYPE{qtype}"


def normalize_name(name: str) -> str:
    """Return a name lowercased and absolute (trailing dot), the form used as a lookup key."""
    name = name.lower()
    return name if name.endswith(".") else name + "."


# --- The Kubernetes-style zones served by Knot ---------------------------------------------

CLUSTER_ZONE = "cluster.local."
REVERSE_ZONE = "10.in-addr.arpa."
RECORD_TTL = 30
# CoreDNS' kubernetes plugin serves its SOA with TTL 5 and MINIMUM 5, so negative answers from
# the cluster zone may be cached for 5 s at most (RFC 2308 §5: min(SOA TTL, MINIMUM)).
SOA_TTL = 5
SOA_MINIMUM = 5
CLUSTER_SOA = f"ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 {SOA_MINIMUM}"
REVERSE_SOA = f"ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 {SOA_MINIMUM}"

KUBERNETES = "kubernetes.default.svc.cluster.local."
KUBE_DNS = "kube-dns.kube-system.svc.cluster.local."
WEB = "web.default.svc.cluster.local."
ALIAS = "alias.default.svc.cluster.local."
SRV_NAME = "_https._tcp.kubernetes.default.svc.cluster.local."
BIG = "big.default.svc.cluster.local."
KUBERNETES_PTR = "1.0.96.10.in-addr.arpa."
KUBE_DNS_PTR = "10.0.96.10.in-addr.arpa."
# 60 A records take 60 * 16 = 960 bytes: over 512 bytes, so a UDP answer without EDNS is
# truncated (RFC 1035 §4.2.1) and the full answer needs TCP or a larger EDNS payload.
BIG_ADDRESSES = [f"10.97.0.{i}" for i in range(1, 61)]

# Every RRset served by Knot, keyed by (owner, type), with rdata in zone-file text.
ZONE_RECORDS: dict[tuple[str, str], list[str]] = {
    (CLUSTER_ZONE, "SOA"): [CLUSTER_SOA],
    (CLUSTER_ZONE, "NS"): ["ns.dns.cluster.local."],
    ("ns.dns.cluster.local.", "A"): ["10.96.0.10"],
    (KUBERNETES, "A"): ["10.96.0.1"],
    (KUBE_DNS, "A"): ["10.96.0.10"],
    (WEB, "A"): ["10.96.0.20"],
    (WEB, "AAAA"): ["fd00:10:96::20"],
    (SRV_NAME, "SRV"): [f"0 100 443 {KUBERNETES}"],
    (ALIAS, "CNAME"): [WEB],
    (BIG, "A"): BIG_ADDRESSES,
    (REVERSE_ZONE, "SOA"): [REVERSE_SOA],
    (REVERSE_ZONE, "NS"): ["ns.dns.cluster.local."],
    (KUBERNETES_PTR, "PTR"): [KUBERNETES],
    (KUBE_DNS_PTR, "PTR"): [KUBE_DNS],
}


def zone_file_text(zone: str) -> str:
    """Return the zone file of one zone of ZONE_RECORDS (SOA first, SOA TTL 5, others TTL 30)."""
    lines = [f"; {zone} for the kube-dns-proxy tests, generated from tests/servers.py"]
    keys = sorted(
        (key for key in ZONE_RECORDS if key[0].endswith(zone)),
        key=lambda key: (key[1] != "SOA", key),
    )
    for owner, rtype in keys:
        ttl = SOA_TTL if rtype == "SOA" else RECORD_TTL
        lines.extend(f"{owner} {ttl} IN {rtype} {rdata}" for rdata in ZONE_RECORDS[(owner, rtype)])
    return "\n".join(lines) + "\n"


def _knot_binary(name: str) -> str:
    """Return the path of a Knot binary; /usr/sbin may be missing from a non-login PATH."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if found is None:
        raise FileNotFoundError(f"{name} not found: run ./dev.sh setup (Debian package knot)")
    return found


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class KnotServer:
    """Knot DNS (knotd) serving ZONE_RECORDS on 127.0.0.1 only, run and stopped by PID."""

    zones = (CLUSTER_ZONE, REVERSE_ZONE)

    def __init__(self, workdir: str | os.PathLike[str] | None = None, host: str = HOST) -> None:
        """Prepare a server on ``host`` (127.0.0.1 or ::1); config, zones and run dir go in workdir or a temp dir."""
        self.host = host
        self.port = 0
        self._own_workdir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="knot-")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "knot.conf"
        self.log_path = self.workdir / "knotd.log"
        self.control_socket = self.workdir / "knot.sock"

    @property
    def address(self) -> str:
        """Return "127.0.0.1:PORT" or "[::1]:PORT"."""
        return _host_port(self.host, self.port)

    @property
    def pid(self) -> int | None:
        """Return the PID of knotd while it runs."""
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 10.0) -> KnotServer:
        """Start knotd and return once it answers a SOA query; retry on a port taken meanwhile."""
        if len(str(self.control_socket)) > 100:
            # A UNIX socket path is limited to 108 bytes (sun_path); deep tmp paths exceed it.
            self._sockdir = Path(tempfile.mkdtemp(prefix="knot-", dir="/tmp"))
            self.control_socket = self._sockdir / "knot.sock"
        for zone in self.zones:
            (self.workdir / f"{zone.rstrip('.')}.zone").write_text(zone_file_text(zone))
        for _ in range(3):
            self.port = free_port()
            self.config_path.write_text(self._config_text())
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [_knot_binary("knotd"), "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready(timeout):
                return self
            exited = self.proc.poll() is not None
            self._terminate()
            log_text = self.log_path.read_bytes()[log_start:].decode(errors="replace")
            # knotd exits when it cannot bind: another process took the port; try another one.
            if not (exited and "cannot bind" in log_text):
                break
        self.stop()  # __exit__ does not run when __enter__ raises
        raise RuntimeError(f"knotd did not become ready; its log:\n{log_text}")

    def _config_text(self) -> str:
        """Return knot.conf: loopback listener, no remotes, mod-stats counting every request."""
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        zones = "\n".join(f"  - domain: {zone}" for zone in self.zones)
        # mod-stats' request-protocol counter is bumped once per request received (udp4/tcp4),
        # which is what query_count() reports; the other counters are not needed.
        return f"""\
server:
    rundir: "{self.workdir}"
    pidfile: "{self.workdir}/knot.pid"
    user: {user}:{group}
    listen: {self.host}@{self.port}
    udp-workers: 2
    tcp-workers: 2
    background-workers: 1
control:
    listen: "{self.control_socket}"
log:
  - target: stderr
    any: notice
database:
    storage: "{self.workdir}"
mod-stats:
  - id: counter
    request-protocol: on
    server-operation: on
    request-bytes: off
    response-bytes: off
    edns-presence: off
    flag-presence: off
    response-code: off
    reply-nodata: off
    query-type: off
    query-size: off
    reply-size: off
template:
  - id: default
    storage: "{self.workdir}"
    file: "%s.zone"
    global-module: mod-stats/counter
    zonefile-sync: -1
    journal-content: none
zone:
{zones}
"""

    def _wait_ready(self, timeout: float) -> bool:
        """Return True once knotd answers the SOA of every zone, False if it exits or times out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        pending = list(self.zones)
        while pending and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            probe = dns.message.make_query(pending[0], "SOA")
            try:
                reply = dns.query.udp(probe, self.host, port=self.port, timeout=0.2)
            except (dns.exception.DNSException, OSError):
                reply = None
            if reply is not None and reply.answer:
                pending.pop(0)
            else:
                time.sleep(0.05)
        return not pending

    def stats(self) -> dict[str, int]:
        """Return knotd's mod-stats counters, e.g. {"request-protocol[udp4]": 3}."""
        result = subprocess.run(
            [
                _knot_binary("knotc"),
                "-c",
                str(self.config_path),
                "-s",
                str(self.control_socket),
                "-t",
                "5",
                "stats",
                "mod-stats",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        counters: dict[str, int] = {}
        for line in result.stdout.splitlines():
            name, _, value = line.partition(" = ")
            if value:
                counters[name.removeprefix("mod-stats.")] = int(value)
        return counters

    def query_count(self, transport: str | None = None) -> int:
        """Return how many DNS requests knotd received, over "udp", "tcp" or both (None)."""
        total = 0
        for name, value in self.stats().items():
            if name.startswith("request-protocol[") and (transport is None or transport in name):
                total += value
        return total

    def _terminate(self) -> None:
        """Stop knotd by PID: SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        """Stop knotd and remove the directories this object created."""
        self._terminate()
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KnotServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- A scriptable upstream for the failure paths -------------------------------------------

MODES = frozenset(
    {
        "answer",
        "nxdomain",
        "nodata",
        "nosoa_nxdomain",
        "servfail",
        "refused",
        "down",
        "hang",
        "slow",
        "truncated",
        "wrong_id",
        "wrong_question",
        "garbage",
        "tcp_close_midway",
    }
)

# (rtype, rdata in zone-file text, ttl)
RecordSpec = tuple[str, str, int]


class ReceivedQuery(NamedTuple):
    """One query as the fake upstream received it."""

    transport: str  # "udp" or "tcp"
    qname: str  # as received, case preserved, absolute; "" if the message did not parse
    qtype: str  # mnemonic, "" if the message did not parse
    id: int
    raw: bytes
    has_edns: bool
    edns_payload: int | None  # the OPT record's UDP payload size (RFC 6891 §6.2.3)
    do_bit: bool  # DNSSEC OK (RFC 3225)
    client_port: int = 0  # the sender's source port (RFC 5452 §4: it should vary)


class FakeUpstream:
    """A DNS server on 127.0.0.1 (UDP and TCP) whose behaviour is chosen by `mode` at run time.

    Modes: "answer" (default), "nxdomain", "nodata", "nosoa_nxdomain", "servfail", "refused",
    "down", "hang", "slow", "truncated", "wrong_id", "wrong_question", "garbage",
    "tcp_close_midway". "down" really closes both sockets, so the kernel answers UDP with ICMP
    port unreachable (a connected UDP socket gets ECONNREFUSED) and TCP connects with RST
    (ECONNREFUSED); open TCP connections are reset. Leaving "down" rebinds the same port.
    "tcp_close_midway" answers UDP with TC=1 so a UDP client is sent to TCP, where the reply
    stops halfway. "garbage" sends the query's ID followed by bytes that cannot parse. In every
    mode a UDP reply larger than 512 bytes (or the query's EDNS payload) becomes TC=1.
    """

    default_address = "192.0.2.1"  # TEST-NET-1 (RFC 5737)

    def __init__(
        self,
        mode: str = "answer",
        *,
        ttl: int = 30,
        neg_ttl: int = 30,
        delay: float = 1.0,
        records: dict[tuple[str, str], list[RecordSpec]] | None = None,
        host: str = HOST,
    ) -> None:
        """Prepare an upstream on ``host`` (127.0.0.1 or ::1); start() binds a free port."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.host = host
        self.port = 0
        self.ttl = ttl
        self.neg_ttl = neg_ttl
        self.delay = delay
        self.records: dict[tuple[str, str], list[RecordSpec]] = dict(records or {})
        self.soa_zone: str | None = None  # owner of the negative SOA; None: the qname's TLD
        self._mode = mode
        self._queries: list[ReceivedQuery] = []
        self._lock = threading.Lock()  # guards _queries, _connections, _timers
        self._state_lock = threading.RLock()  # serializes start/stop/mode changes
        self._running = False
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._serving: threading.Event | None = None  # set to stop the current serving threads
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._timers: set[threading.Timer] = set()

    @property
    def address(self) -> str:
        """Return "127.0.0.1:PORT" or "[::1]:PORT"."""
        return _host_port(self.host, self.port)

    # -- lifecycle --

    @property
    def mode(self) -> str:
        """Return the current mode."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        """Switch mode; entering or leaving "down" closes or reopens the sockets (same port)."""
        if value not in MODES:
            raise ValueError(f"unknown mode {value!r}")
        with self._state_lock:
            previous, self._mode = self._mode, value
            if not self._running:
                return
            if value == "down" and previous != "down":
                self._close_sockets()
            elif previous == "down" and value != "down":
                self._open_sockets()

    def start(self) -> FakeUpstream:
        """Bind a free port (UDP and TCP) and serve it from background threads."""
        with self._state_lock:
            if self._running:
                return self
            self.port = free_port()
            self._running = True
            if self._mode != "down":
                self._open_sockets()
        return self

    def stop(self) -> None:
        """Close the sockets, reset open connections and join the serving threads."""
        with self._state_lock:
            if self._running:
                self._close_sockets()
                self._running = False

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _open_sockets(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            # No SO_REUSEADDR on UDP: a second process must not be able to share the port.
            udp.bind((self.host, self.port))
            # SO_REUSEADDR on TCP only so the port can be rebound while old connections of
            # this server sit in TIME_WAIT after "down".
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.host, self.port))
            tcp.listen(64)
        except OSError:
            udp.close()
            tcp.close()
            raise
        self._udp, self._tcp = udp, tcp
        self._serving = threading.Event()
        thread = threading.Thread(target=self._serve, args=(udp, tcp, self._serving), name="fake-upstream", daemon=True)
        self._threads = [thread]
        thread.start()

    def _close_sockets(self) -> None:
        if self._serving is not None:
            self._serving.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        with self._lock:
            timers, self._timers = self._timers, set()
            connections, self._connections = self._connections, set()
        for timer in timers:
            timer.cancel()
        for conn in connections:
            _reset(conn)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None

    def _serve(self, udp: socket.socket, tcp: socket.socket, stopping: threading.Event) -> None:
        """Serve UDP datagrams and accept TCP connections until `stopping` is set."""
        with selectors.DefaultSelector() as selector:
            selector.register(udp, selectors.EVENT_READ)
            selector.register(tcp, selectors.EVENT_READ)
            while not stopping.is_set():
                for key, _ in selector.select(timeout=0.02):
                    if key.fileobj is udp:
                        try:
                            raw, client = udp.recvfrom(65535)
                        except OSError:
                            continue
                        self._on_udp(udp, raw, client, stopping)
                    else:
                        try:
                            conn, client = tcp.accept()
                        except OSError:
                            continue
                        with self._lock:
                            self._connections.add(conn)
                        threading.Thread(
                            target=self._serve_connection,
                            args=(conn, client[1], stopping),
                            name="fake-upstream-tcp",
                            daemon=True,
                        ).start()

    # -- transports --

    def _on_udp(
        self,
        udp: socket.socket,
        raw: bytes,
        client: tuple[str, int],
        stopping: threading.Event,
    ) -> None:
        mode = self._mode
        query = self._record("udp", raw, client[1])
        if query is None or mode in ("hang", "down"):
            return

        def send() -> None:
            if stopping.is_set():
                return
            reply = self._reply(query, mode, "udp")
            if reply is not None:
                with contextlib.suppress(OSError):
                    udp.sendto(reply, client)

        if mode == "slow":
            timer = threading.Timer(self.delay, send)
            timer.daemon = True
            with self._lock:
                self._timers.add(timer)
            timer.start()
        else:
            send()

    def _serve_connection(self, conn: socket.socket, client_port: int, stopping: threading.Event) -> None:
        """Answer length-prefixed queries (RFC 7766 §8) on one TCP connection, in order."""
        conn.settimeout(0.05)
        try:
            while not stopping.is_set():
                header = _recv_exact(conn, 2, stopping)
                if header is None:
                    return
                raw = _recv_exact(conn, struct.unpack("!H", header)[0], stopping)
                if raw is None:
                    return
                mode = self._mode
                query = self._record("tcp", raw, client_port)
                if query is None or mode == "hang":
                    continue
                if mode == "slow" and stopping.wait(self.delay):
                    return
                reply = self._reply(query, mode, "tcp")
                if reply is None:
                    continue
                framed = struct.pack("!H", len(reply)) + reply
                if mode == "tcp_close_midway":
                    # Send the length and half the message, then close (FIN): the client
                    # sees EOF before the promised number of bytes arrived.
                    conn.sendall(framed[: 2 + len(reply) // 2])
                    return
                conn.sendall(framed)
        except OSError:
            return
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    # -- messages --

    def _record(self, transport: str, raw: bytes, client_port: int) -> dnslib.DNSRecord | None:
        """Remember a received query; return it parsed, or None if it does not parse."""
        try:
            query = dnslib.DNSRecord.parse(raw)
        except Exception:  # dnslib raises several types on bad input
            query = None
        if query is None or not query.questions:
            qid = struct.unpack("!H", raw[:2])[0] if len(raw) >= 2 else 0
            self._append(ReceivedQuery(transport, "", "", qid, raw, False, None, False, client_port))
            return None
        opt = next((rr for rr in query.ar if rr.rtype == dnslib.QTYPE.OPT), None)
        self._append(
            ReceivedQuery(
                transport=transport,
                qname=str(query.q.qname),
                qtype=qtype_name(query.q.qtype),
                id=query.header.id,
                raw=raw,
                has_edns=opt is not None,
                edns_payload=opt.rclass if opt is not None else None,
                # The DO bit is the top bit of the OPT TTL's flags half (RFC 6891 §6.1.3).
                do_bit=bool(opt is not None and opt.ttl & 0x8000),
                client_port=client_port,
            )
        )
        return query

    def _append(self, query: ReceivedQuery) -> None:
        with self._lock:
            self._queries.append(query)

    def _reply(self, query: dnslib.DNSRecord, mode: str, transport: str) -> bytes | None:
        """Return the reply bytes for a query in a mode, or None for no reply."""
        qname = str(query.q.qname)
        rcode = dnslib.RCODE.NOERROR
        if mode == "garbage":
            # The query's ID, then a header promising 1 question and 5 answers that never come:
            # it matches the query by ID but cannot be parsed.
            return raw_id(query) + b"\x81\x80\x00\x01\x00\x05\x00\x00\x00\x00" + os.urandom(7)
        if mode in ("servfail", "refused"):
            reply = self._empty_reply(query, getattr(dnslib.RCODE, mode.upper()))
        elif mode in ("nxdomain", "nosoa_nxdomain", "nodata"):
            rcode = dnslib.RCODE.NOERROR if mode == "nodata" else dnslib.RCODE.NXDOMAIN
            reply = self._empty_reply(query, rcode)
            if mode != "nosoa_nxdomain":
                reply.add_auth(self._soa(qname))
        elif (mode in ("truncated", "tcp_close_midway")) and transport == "udp":
            # TC=1 with no records tells the client to retry over TCP (RFC 7766 §5).
            reply = self._empty_reply(query, rcode)
            reply.header.tc = 1
        elif mode == "wrong_question":
            other = dnslib.DNSRecord.question("wrong-question." + qname, qtype_name(query.q.qtype))
            other.header.id = query.header.id
            reply = self._answer(other)
        else:
            reply = self._answer(query)
        if mode == "wrong_id":
            reply.header.id = (query.header.id + 1) & 0xFFFF
        packed = reply.pack()
        limit = _udp_limit(query)
        if transport == "udp" and len(packed) > limit:
            # Too big for the client's UDP buffer: send the question with TC=1 (RFC 1035 §4.2.1).
            small = self._empty_reply(query, reply.header.rcode)
            small.header.id = reply.header.id
            small.header.tc = 1
            packed = small.pack()
        return packed

    def _empty_reply(self, query: dnslib.DNSRecord, rcode: int) -> dnslib.DNSRecord:
        """Return a reply echoing the question exactly (case kept), with EDNS if asked."""
        header = dnslib.DNSHeader(id=query.header.id, qr=1, opcode=query.header.opcode, rd=query.header.rd, ra=1)
        header.rcode = rcode
        reply = dnslib.DNSRecord(header, q=query.q)
        if any(rr.rtype == dnslib.QTYPE.OPT for rr in query.ar):
            reply.add_ar(dnslib.EDNS0(udp_len=1232))
        return reply

    def _answer(self, query: dnslib.DNSRecord) -> dnslib.DNSRecord:
        """Answer from `records` (following CNAMEs), with a default A, or NODATA with a SOA."""
        qname = str(query.q.qname)
        qtype = qtype_name(query.q.qtype)
        table = {(normalize_name(n), t.upper()): specs for (n, t), specs in self.records.items()}
        reply = self._empty_reply(query, dnslib.RCODE.NOERROR)
        owner = qname
        for _ in range(8):  # bounded CNAME chain
            key = normalize_name(owner)
            if (key, qtype) in table:
                _add_answers(reply, owner, table[(key, qtype)])
                return reply
            if qtype != "CNAME" and (key, "CNAME") in table:
                cname = table[(key, "CNAME")]
                _add_answers(reply, owner, cname)
                owner = cname[0][1]
                continue
            break
        if owner == qname and qtype == "A":
            _add_answers(reply, qname, [("A", self.default_address, self.ttl)])
        elif not reply.rr:
            reply.add_auth(self._soa(qname))
        return reply

    def _soa(self, qname: str) -> dnslib.RR:
        """Return the SOA of a negative answer; its TTL and MINIMUM are neg_ttl (RFC 2308 §3)."""
        zone = self.soa_zone or (normalize_name(qname).rstrip(".").rsplit(".", 1)[-1] + ".")
        mname, rname = "ns.fake-upstream.invalid.", "hostmaster.fake-upstream.invalid."
        rdata = f"{mname} {rname} 1 7200 1800 86400 {self.neg_ttl}"
        return dnslib.RR.fromZone(f"{zone} {self.neg_ttl} IN SOA {rdata}")[0]

    # -- what was received --

    @property
    def queries(self) -> list[ReceivedQuery]:
        """Return a snapshot of every query received so far, oldest first."""
        with self._lock:
            return list(self._queries)

    def count(self, qname: str | None = None, qtype: str | None = None, transport: str | None = None) -> int:
        """Return how many received queries match qname (any case), qtype and transport."""
        wanted = normalize_name(qname) if qname is not None else None
        with self._lock:
            return sum(
                1
                for query in self._queries
                if (wanted is None or (query.qname and normalize_name(query.qname) == wanted))
                and (qtype is None or query.qtype == qtype.upper())
                and (transport is None or query.transport == transport)
            )

    def source_ports(self, transport: str | None = None) -> set[int]:
        """Return the distinct client source ports of the queries received (over transport)."""
        with self._lock:
            return {query.client_port for query in self._queries if transport is None or query.transport == transport}

    def reset(self) -> None:
        """Forget every received query."""
        with self._lock:
            self._queries.clear()


def raw_id(query: dnslib.DNSRecord) -> bytes:
    """Return a message's ID as the two bytes that start it on the wire."""
    return struct.pack("!H", query.header.id)


def _udp_limit(query: dnslib.DNSRecord) -> int:
    """Return the largest UDP reply the client accepts: 512, or its EDNS payload (RFC 6891)."""
    for rr in query.ar:
        if rr.rtype == dnslib.QTYPE.OPT:
            return max(512, rr.rclass)
    return 512


def _add_answers(reply: dnslib.DNSRecord, owner: str, specs: Iterable[RecordSpec]) -> None:
    for rtype, rdata, ttl in specs:
        for rr in dnslib.RR.fromZone(f"{owner} {ttl} IN {rtype} {rdata}"):
            reply.add_answer(rr)


def _recv_exact(conn: socket.socket, size: int, stopping: threading.Event) -> bytes | None:
    """Read exactly size bytes; return None on EOF or when the server stops."""
    data = b""
    while len(data) < size:
        if stopping.is_set():
            return None
        try:
            chunk = conn.recv(size - len(data))
        except TimeoutError:
            continue
        if not chunk:
            return None
        data += chunk
    return data


def _reset(conn: socket.socket) -> None:
    """Close a TCP connection with RST (SO_LINGER 0) rather than FIN, like a crashed server."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        conn.close()
