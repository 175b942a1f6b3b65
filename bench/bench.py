"""Benchmark harness: the proxy, Unbound, dnsmasq (and Knot Resolver) as caching forwarders to one knotd.

Run by hand from anywhere: `python bench/bench.py [--quick] [--workloads ...] [--servers ...]`.
Every server under test is pinned to CPU 0, the load generator (dnsperf) and the authoritative
upstream (knotd) to CPU 1; all traffic stays on 127.0.0.1. See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
SERVER_CPU = "0"
LOADGEN_CPU = "1"

QTYPE_A = 1
QTYPE_AAAA = 28

# Zone shape: 200 namespaces x 100 services = 20,000 Kubernetes-style names, each with A and AAAA.
NAMESPACES = 200
SERVICES_PER_NAMESPACE = 100
POSITIVE_TTL = 30
# Negative answers live min(SOA TTL, SOA MINIMUM) seconds (RFC 2308 §5); 5 s as in NodeLocal DNSCache.
NEGATIVE_TTL = 5
EXTERNAL_NAMES = 200
# glibc's resolver in a pod: ndots:5 and the search list a kubelet writes for namespace "default".
POD_SEARCH = ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")

ALL_WORKLOADS = ("hot", "realistic", "miss", "ndots")
ALL_SERVERS = ("proxy", "proxy-nometrics", "unbound", "dnsmasq", "kresd")
ANCHORS = ("unbound", "dnsmasq", "kresd")

WORKLOAD_TITLES = {
    "hot": "hot: 1,000 names (A), all cache hits after one warm-up pass",
    "realistic": "realistic: 20,000 names, zipf popularity, A+AAAA, ndots:5 search-path NXDOMAINs, cold start",
    "miss": "miss-heavy: every qname unique (NXDOMAIN from knotd), every query forwarded",
    "ndots": "ndots: external names expanded by a pod's search list (4 candidates x A+AAAA), cold start",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long and how hard each measurement runs."""

    repeats: int
    qps_seconds: float
    latency_seconds: float
    latency_rate: int
    clients: int
    outstanding: int
    timeout: float
    fill_count: int
    fill_seconds: float
    memory_servers: tuple[str, ...] | None


@dataclasses.dataclass
class DnsperfResult:
    """The numbers one dnsperf run reports (latencies only when run with -v)."""

    sent: int
    completed: int
    lost: int
    run_seconds: float
    qps: float
    avg_latency: float
    latencies: list[float]


@dataclasses.dataclass
class RunResult:
    """One server, one workload, one repeat."""

    qps: float
    avg_ms: float
    p99_ms: float
    lost_max: float
    lost_fixed: float
    peak_rss_mb: float
    upstream_per_1k: float
    ideal_per_1k: float
    server_cpu_pct: float
    loadgen_cpu_pct: float
    other_cpu0_pct: float
    cold_per_lookup: float | None = None
    warm_per_lookup: float | None = None


class BenchError(Exception):
    """A step of the benchmark could not be carried out (message says which)."""


class ServerStartError(BenchError):
    """A server under test exited or never answered."""


# --------------------------------------------------------------------------------------------
# Processes: every child is started here, remembered by PID and stopped by PID.


class ProcessRegistry:
    """Start children in their own session and stop exactly those, also on Ctrl-C."""

    def __init__(self) -> None:
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, cmd: Sequence[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start cmd with stdout and stderr to log_path."""
        with open(log_path, "wb") as log:
            # A new session keeps a terminal Ctrl-C from killing children before we stop them in order.
            proc = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                start_new_session=True,
            )
        self._procs[proc.pid] = proc
        return proc

    def run(self, cmd: Sequence[str], timeout: float) -> str:
        """Run cmd to completion (killed after timeout seconds) and return its stdout and stderr."""
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._procs[proc.pid] = proc
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{' '.join(cmd[:4])} ran longer than {timeout:.0f} s") from exc
        finally:
            # Also on Ctrl-C: kill it if still running and reap it, so nothing is left behind.
            self.stop(proc)
        return out.decode(errors="replace")

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after grace seconds, this one PID only."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace)
        self._procs.pop(proc.pid, None)

    def stop_all(self) -> None:
        """Stop every child still running, newest first."""
        for pid in sorted(self._procs, reverse=True):
            proc = self._procs.get(pid)
            if proc is not None:
                with contextlib.suppress(Exception):
                    self.stop(proc)


def free_port() -> int:
    """A loopback port that is free for both UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise BenchError("no free loopback port")


def read_status_kb(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status (VmHWM: peak RSS, VmRSS: current RSS) in kB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"{field} missing for pid {pid}")


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all threads included."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # Fields after the command name start at field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_busy_ticks(cpu: str) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat."""
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(f"cpu{cpu} "):
                values = [int(v) for v in line.split()[1:]]
                idle = values[3] + values[4]
                return sum(values) - idle, sum(values)
    raise BenchError(f"cpu{cpu} missing from /proc/stat")


# --------------------------------------------------------------------------------------------
# DNS on the wire, just enough to probe servers and play a pod's resolver.


def build_query(qid: int, qname: str, qtype: int) -> bytes:
    """A recursion-desired query for qname/qtype in class IN (RFC 1035 §4.1)."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    wire_name = b"".join(bytes([len(label)]) + label.encode() for label in qname.rstrip(".").split(".")) + b"\x00"
    return header + wire_name + struct.pack("!HH", qtype, 1)


def ask(port: int, queries: Sequence[tuple[str, int]], timeout: float) -> list[tuple[int, int] | None]:
    """Send queries at once (as glibc sends A and AAAA together) and collect (rcode, ancount) per query."""
    answers: list[tuple[int, int] | None] = [None] * len(queries)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((LOOPBACK, port))
        ids = {}
        for index, (qname, qtype) in enumerate(queries):
            qid = random.randrange(65536)
            while qid in ids:
                qid = random.randrange(65536)
            ids[qid] = index
            sock.send(build_query(qid, qname, qtype))
        deadline = time.monotonic() + timeout
        pending = len(queries)
        while pending and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply = sock.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                break
            if len(reply) < 12:
                continue
            qid, flags, _, ancount = struct.unpack("!HHHH", reply[:8])
            index = ids.get(qid)
            if index is not None and answers[index] is None and flags & 0x8000:
                answers[index] = (flags & 0x000F, ancount)
                pending -= 1
    return answers


def wait_until_answering(port: int, proc: subprocess.Popen[bytes], seconds: float) -> None:
    """Poll with a query until any reply arrives; fail if the process exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"exited with status {proc.returncode}")
        if ask(port, [("ready.probe.cluster.local", QTYPE_A)], 0.3)[0] is not None:
            return
        time.sleep(0.1)
    raise ServerStartError(f"no answer on {LOOPBACK}:{port} within {seconds:.0f} s")


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error reports."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# The authoritative upstream.


def svc_name(service: int, namespace: int) -> str:
    """The Service name a pod resolves, as CoreDNS's kubernetes plugin would serve it."""
    return f"svc-{service}.ns-{namespace}.svc.cluster.local"


def write_zones(directory: Path) -> tuple[Path, Path]:
    """Write cluster.local (20,000 services + a fill wildcard) and example.com (external names)."""
    cluster = directory / "cluster.local.zone"
    lines = [
        "$ORIGIN cluster.local.",
        f"$TTL {POSITIVE_TTL}",
        f"@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 {NEGATIVE_TTL}",
        "@ IN NS ns.dns.cluster.local.",
        "ns.dns IN A 127.0.0.1",
        # 100,000 distinct names for the memory measurement, answered by one wildcard (RFC 4592).
        "*.fill IN A 10.255.0.1",
        "*.fill IN AAAA fd00::ff:1",
    ]
    for namespace in range(NAMESPACES):
        for service in range(SERVICES_PER_NAMESPACE):
            n = namespace * SERVICES_PER_NAMESPACE + service
            owner = f"svc-{service}.ns-{namespace}.svc"
            lines.append(f"{owner} IN A 10.{96 + n // 65536}.{(n // 256) % 256}.{n % 256}")
            lines.append(f"{owner} IN AAAA fd00::{n // 65536:x}:{n % 65536:x}")
    cluster.write_text("\n".join(lines) + "\n")
    external = directory / "example.com.zone"
    lines = [
        "$ORIGIN example.com.",
        f"$TTL {POSITIVE_TTL}",
        f"@ IN SOA ns.example.com. hostmaster.example.com. 1 7200 1800 86400 {NEGATIVE_TTL}",
        "@ IN NS ns.example.com.",
        "ns IN A 127.0.0.1",
        "@ IN A 192.0.2.1",
        "@ IN AAAA 2001:db8::1",
    ]
    for n in range(EXTERNAL_NAMES):
        lines.append(f"ext-{n} IN A 192.0.2.{n % 250 + 2}")
        lines.append(f"ext-{n} IN AAAA 2001:db8::{n + 2:x}")
    external.write_text("\n".join(lines) + "\n")
    return cluster, external


class Knot:
    """knotd serving the generated zones on loopback, counting every query with mod-stats."""

    def __init__(self, registry: ProcessRegistry, directory: Path) -> None:
        self.registry = registry
        self.directory = directory
        self.port = free_port()
        self.socket_path = directory / "knot.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Write zones and config, start knotd on CPU 1 and wait until it answers and counts."""
        self.directory.mkdir(parents=True, exist_ok=True)
        cluster, external = write_zones(self.directory)
        config = self.directory / "knot.conf"
        config.write_text(
            f"""server:
    rundir: "{self.directory}"
    listen: {LOOPBACK}@{self.port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: warning
database:
    storage: "{self.directory}"
mod-stats:
  - id: counts
    request-protocol: on
    server-operation: on
    request-bytes: off
    response-bytes: off
    edns-presence: off
    flag-presence: off
    response-code: on
    query-type: off
    query-size: off
    reply-size: off
template:
  - id: default
    storage: "{self.directory}"
    journal-content: none
    zonefile-sync: -1
    global-module: mod-stats/counts
zone:
  - domain: cluster.local.
    file: "{cluster}"
  - domain: example.com.
    file: "{external}"
"""
        )
        cmd = ["taskset", "-c", LOADGEN_CPU, "knotd", "-c", str(config), "-s", str(self.socket_path)]
        self.proc = self.registry.start(cmd, self.directory / "knotd.log")
        try:
            wait_until_answering(self.port, self.proc, 30)
        except ServerStartError as exc:
            raise BenchError(f"knotd: {exc}\n{log_tail(self.directory / 'knotd.log')}") from exc
        # Check the counter moves by exactly the queries we send, so upstream counts can be trusted.
        before = self.query_count()
        ask(self.port, [("svc-0.ns-0.svc.cluster.local", QTYPE_A), ("nope.cluster.local", QTYPE_AAAA)], 2)
        after = self.query_count()
        if after - before != 2:
            raise BenchError(f"knotd mod-stats counted {after - before} queries for 2 sent")

    def query_count(self) -> int:
        """Queries knotd has received so far (mod-stats server-operation[query])."""
        out = self.registry.run(["knotc", "-s", str(self.socket_path), "stats", "mod-stats"], timeout=10)
        match = re.search(r"server-operation\[query\]\s*=\s*(\d+)", out)
        if match is None:
            if "error" in out.lower():
                raise BenchError(f"knotc stats failed: {out.strip()}")
            return 0
        return int(match.group(1))

    def stop(self) -> None:
        """Stop knotd."""
        if self.proc is not None:
            self.registry.stop(self.proc)
            self.proc = None


# --------------------------------------------------------------------------------------------
# The servers under test.


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """How to check for and launch one server under test."""

    name: str
    available: Callable[[], str | None]
    command: Callable[[Path, int, int], list[str]]
    cwd: Path | None = None


def proxy_available() -> str | None:
    """None if proxy.py exists at the repo root, else why not."""
    return None if (REPO_ROOT / "proxy.py").is_file() else f"{REPO_ROOT / 'proxy.py'} does not exist"


def proxy_command(_: Path, port: int, upstream_port: int) -> list[str]:
    """The proxy with a cache large enough for every workload."""
    return [
        sys.executable,
        "proxy.py",
        "--listen",
        f"{LOOPBACK}:{port}",
        "--upstream",
        f"{LOOPBACK}:{upstream_port}",
        "--log-level",
        "warning",
        "--cache-size",
        "200000",
    ]


def binary_available(binary: str) -> Callable[[], str | None]:
    """A check that binary is on PATH (or in /usr/sbin)."""

    def check() -> str | None:
        return None if find_binary(binary) else f"{binary} is not installed"

    return check


def find_binary(binary: str) -> str | None:
    """The path of binary, looking in the sbin directories too."""
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin:/usr/local/sbin")


def unbound_command(directory: Path, port: int, upstream_port: int) -> list[str]:
    """Unbound as a one-thread, non-validating caching forwarder."""
    config = directory / "unbound.conf"
    config.write_text(
        f"""server:
    interface: {LOOPBACK}
    port: {port}
    do-ip6: no
    do-tcp: yes
    num-threads: 1
    username: ""
    chroot: ""
    directory: "{directory}"
    pidfile: ""
    do-daemonize: no
    use-syslog: no
    logfile: ""
    verbosity: 0
    # The upstream lives on loopback, which Unbound refuses to query by default.
    do-not-query-localhost: no
    # Forwarding only: no DNSSEC validation (the zones are unsigned; a validator would need trust anchors).
    module-config: "iterator"
    domain-insecure: "."
    # Big enough for the 100,000-entry memory fill and the realistic mix without evictions.
    msg-cache-size: 128m
    rrset-cache-size: 256m
    num-queries-per-thread: 4096
    outgoing-range: 8192
    access-control: 127.0.0.0/8 allow
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: {LOOPBACK}@{upstream_port}
"""
    )
    return [find_binary("unbound") or "unbound", "-d", "-c", str(config)]


def dnsmasq_command(directory: Path, port: int, upstream_port: int) -> list[str]:
    """dnsmasq as a caching forwarder: no DHCP, no hosts file, no resolv.conf."""
    return [
        find_binary("dnsmasq") or "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        f"--server={LOOPBACK}#{upstream_port}",
        "--cache-size=150000",
        f"--listen-address={LOOPBACK}",
        f"--port={port}",
        "--bind-interfaces",
        "--pid-file=",
        "--user=root",
    ]


def kresd_command(directory: Path, port: int, upstream_port: int) -> list[str]:
    """Knot Resolver forwarding everything, without validation, with a fresh LMDB cache."""
    rundir = directory / f"kresd-{port}"
    rundir.mkdir(parents=True, exist_ok=True)
    config = rundir / "config.lua"
    config.write_text(
        f"""-- Forwarding only: no DNSSEC validation (the zones are unsigned).
trust_anchors.remove('.')
net.listen('{LOOPBACK}', {port}, {{ kind = 'dns' }})
cache.open(200 * MB, 'lmdb://{rundir}/cache')
policy.add(policy.all(policy.FORWARD('{LOOPBACK}@{upstream_port}')))
"""
    )
    return [find_binary("kresd") or "kresd", "-n", "-q", "-c", str(config), str(rundir)]


def proxy_nometrics_command(rundir: Path, port: int, upstream_port: int) -> list[str]:
    """The proxy without per-hit metric counts: the difference to "proxy" is what metrics cost."""
    return [*proxy_command(rundir, port, upstream_port), "--no-metrics"]


SERVER_SPECS = {
    "proxy": ServerSpec("proxy", proxy_available, proxy_command, REPO_ROOT),
    "proxy-nometrics": ServerSpec("proxy-nometrics", proxy_available, proxy_nometrics_command, REPO_ROOT),
    "unbound": ServerSpec("unbound", binary_available("unbound"), unbound_command),
    "dnsmasq": ServerSpec("dnsmasq", binary_available("dnsmasq"), dnsmasq_command),
    "kresd": ServerSpec("kresd", binary_available("kresd"), kresd_command),
}


class RunningServer:
    """One started server under test, pinned to CPU 0."""

    def __init__(self, registry: ProcessRegistry, spec: ServerSpec, directory: Path, upstream_port: int) -> None:
        self.registry = registry
        self.spec = spec
        self.port = free_port()
        self.log_path = directory / f"{spec.name}-{self.port}.log"
        cmd = ["taskset", "-c", SERVER_CPU, *spec.command(directory, self.port, upstream_port)]
        self.cmd = cmd
        self.proc = registry.start(cmd, self.log_path, cwd=spec.cwd)
        try:
            wait_until_answering(self.port, self.proc, 20)
        except ServerStartError as exc:
            self.stop()
            raise ServerStartError(
                f"{spec.name} did not start: {exc}\n  command: {' '.join(cmd)}\n  log tail:\n{log_tail(self.log_path)}"
            ) from exc

    @property
    def pid(self) -> int:
        """The server's own PID (taskset execs the server, so it keeps taskset's PID)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop the server."""
        self.registry.stop(self.proc)


# --------------------------------------------------------------------------------------------
# Query files (dnsperf's format: "qname qtype" per line).


def expand_search(name: str, search: Sequence[str], ndots: int = 5) -> list[str]:
    """The qnames glibc tries for name, in order, with `ndots:N` and a search list (resolv.conf(5))."""
    if name.endswith("."):
        return [name.rstrip(".")]
    suffixed = [f"{name}.{domain}" for domain in search]
    return suffixed + [name] if name.count(".") < ndots else [name, *suffixed]


def zipf_choices(rng: random.Random, population: int, count: int, exponent: float = 1.0) -> list[int]:
    """count ranks in [0, population) drawn with probability proportional to 1 / (rank + 1) ** exponent."""
    weights = list(itertools.accumulate(1.0 / (rank + 1) ** exponent for rank in range(population)))
    return rng.choices(range(population), cum_weights=weights, k=count)


def resolved_name(candidates: list[str], exists: Callable[[str], bool]) -> list[str]:
    """The candidates a pod actually sends: up to and including the first one that exists."""
    sent = []
    for candidate in candidates:
        sent.append(candidate)
        if exists(candidate):
            break
    return sent


def is_service(qname: str) -> bool:
    """Whether qname exists in the generated cluster.local zone (a Service name)."""
    parts = qname.split(".")
    return (
        len(parts) == 5
        and parts[0].startswith("svc-")
        and parts[1].startswith("ns-")
        and parts[2:] == ["svc", "cluster", "local"]
    )


def is_external(qname: str) -> bool:
    """Whether qname exists in the generated example.com zone."""
    parts = qname.split(".")
    return parts[-2:] == ["example", "com"] and (len(parts) == 2 or (len(parts) == 3 and parts[0].startswith("ext-")))


def hot_queries() -> list[tuple[str, str]]:
    """1,000 Service names, A only: after a warm-up pass every query is a cache hit."""
    return [(svc_name(service, namespace), "A") for namespace in range(10) for service in range(100)]


def realistic_queries(rng: random.Random, lookups: int) -> list[tuple[str, str]]:
    """Pods in 20 namespaces looking up Services with zipf popularity, as glibc sends them with ndots:5.

    A lookup is one of: a same-namespace short name (`svc-N`), a cross-namespace name (`svc-N.ns-M`,
    one search-path NXDOMAIN first) or a fully qualified name without the dot (three NXDOMAINs
    first, the classic ndots:5 amplification). Each candidate is asked for A and AAAA together.
    """
    services = [(s, n) for n in range(NAMESPACES) for s in range(SERVICES_PER_NAMESPACE)]
    rng.shuffle(services)  # Popularity rank is independent of the name's number.
    queries: list[tuple[str, str]] = []
    for rank in zipf_choices(rng, len(services), lookups):
        service, namespace = services[rank]
        form = rng.random()
        if form < 0.4:
            client_ns, name = namespace, f"svc-{service}"
        else:
            client_ns = rng.randrange(20)
            name = f"svc-{service}.ns-{namespace}" if form < 0.8 else svc_name(service, namespace)
        search = (f"ns-{client_ns}.svc.cluster.local", "svc.cluster.local", "cluster.local")
        for qname in resolved_name(expand_search(name, search), is_service):
            queries += [(qname, "A"), (qname, "AAAA")]
    return queries


def ndots_lookup(name: str) -> list[str]:
    """The qnames a pod in namespace default sends to resolve an external name with ndots:5."""
    return resolved_name(expand_search(name, POD_SEARCH), is_external)


def ndots_queries(rng: random.Random, lookups: int) -> list[tuple[str, str]]:
    """Repeated lookups of 50 external names, each expanded by the pod search list (8 queries each)."""
    queries: list[tuple[str, str]] = []
    for _ in range(lookups):
        for qname in ndots_lookup(f"ext-{rng.randrange(50)}.example.com"):
            queries += [(qname, "A"), (qname, "AAAA")]
    return queries


def miss_queries(tag: str, count: int) -> Iterator[tuple[str, str]]:
    """count qnames that exist nowhere and never repeat: each one is a cache miss and an NXDOMAIN."""
    for n in range(count):
        yield f"miss-{tag}-{n}.ns-0.svc.cluster.local", "A"


def write_queries(path: Path, queries: Iterator[tuple[str, str]] | list[tuple[str, str]]) -> Path:
    """Write a dnsperf data file."""
    with open(path, "w") as out:
        out.writelines(f"{qname} {qtype}\n" for qname, qtype in queries)
    return path


def ideal_upstream(queries: list[tuple[str, str]], sent: int, seconds: float, prewarmed: bool) -> int:
    """Upstream queries a perfect cache needs: one per (qname, qtype) per TTL window.

    dnsperf cycles through the file; sends are assumed evenly spread over the run. Names that
    exist live POSITIVE_TTL seconds, the rest (NXDOMAIN) NEGATIVE_TTL seconds (RFC 2308).
    """
    if not queries or sent <= 0:
        return 0
    expires: dict[tuple[str, str], float] = {}
    if prewarmed:
        expires = {key: POSITIVE_TTL if is_service(key[0]) or is_external(key[0]) else NEGATIVE_TTL for key in queries}
    needed = 0
    step = seconds / sent
    for index in range(sent):
        key = queries[index % len(queries)]
        now = index * step
        if expires.get(key, -1.0) <= now:
            needed += 1
            ttl = POSITIVE_TTL if is_service(key[0]) or is_external(key[0]) else NEGATIVE_TTL
            expires[key] = now + ttl
    return needed


@dataclasses.dataclass
class Workload:
    """Query files of one workload and how to drive them."""

    name: str
    qps_file: Path
    latency_file: Path
    queries: list[tuple[str, str]]  # The qps file's content, for the ideal upstream count (empty for miss).
    warm_up: bool
    one_pass: bool  # True: the file must not repeat (unique names), so dnsperf stops at its end.
    qps_file_lines: int


def describe(workload: Workload) -> str:
    """What the workload's query file holds: size, distinct keys, share of names that do not exist."""
    if not workload.queries:
        return f"{workload.qps_file_lines:,} unique qnames (dnsperf stops at the end of the file if it gets there)"
    distinct = set(workload.queries)
    missing = sum(1 for qname, _ in workload.queries if not (is_service(qname) or is_external(qname)))
    return (
        f"{len(workload.queries):,} queries in the file (dnsperf cycles through it), {len(distinct):,} distinct "
        f"(qname, qtype), {100 * missing / len(workload.queries):.0f}% of queries are for names that do not exist"
    )


def build_workloads(directory: Path, names: Sequence[str], settings: Settings) -> dict[str, Workload]:
    """Generate the query files of the chosen workloads (seeded, so every run sends the same queries)."""
    rng = random.Random(20260)
    workloads: dict[str, Workload] = {}
    for name in names:
        if name == "hot":
            queries = hot_queries()
            path = write_queries(directory / "hot.txt", queries)
            workloads[name] = Workload(name, path, path, queries, True, False, len(queries))
        elif name == "realistic":
            queries = realistic_queries(rng, 150_000)
            path = write_queries(directory / "realistic.txt", queries)
            workloads[name] = Workload(name, path, path, queries, False, False, len(queries))
        elif name == "miss":
            # Enough unique names that no C server can exhaust them in one run (it stops early if it does).
            lines = int(min(2_000_000, 200_000 * settings.qps_seconds))
            qps_path = write_queries(directory / "miss-qps.txt", miss_queries("q", lines))
            latency_lines = int(settings.latency_rate * settings.latency_seconds * 1.5) + 1000
            latency_path = write_queries(directory / "miss-latency.txt", miss_queries("l", latency_lines))
            workloads[name] = Workload(name, qps_path, latency_path, [], False, True, lines)
        elif name == "ndots":
            queries = ndots_queries(rng, 10_000)
            path = write_queries(directory / "ndots.txt", queries)
            workloads[name] = Workload(name, path, path, queries, False, False, len(queries))
    return workloads


# --------------------------------------------------------------------------------------------
# dnsperf.


def parse_dnsperf(output: str, verbose: bool) -> DnsperfResult:
    """Pull the summary numbers (and with -v each query's latency) out of dnsperf's output."""

    def number(label: str) -> float:
        match = re.search(rf"{label}:\s+([\d.]+)", output)
        if match is None:
            raise BenchError(f"dnsperf output has no '{label}':\n{output[-1500:]}")
        return float(match.group(1))

    latencies = []
    if verbose:
        for line in output.splitlines():
            # "> NOERROR svc-1.ns-0.svc.cluster.local A 0.000085": rcode, qname, qtype, seconds.
            if line.startswith("> "):
                with contextlib.suppress(ValueError, IndexError):
                    latencies.append(float(line.rsplit(" ", 1)[1]))
    return DnsperfResult(
        sent=int(number("Queries sent")),
        completed=int(number("Queries completed")),
        lost=int(number("Queries lost")),
        run_seconds=number(r"Run time \(s\)"),
        qps=number("Queries per second"),
        avg_latency=number(r"Average Latency \(s\)"),
        latencies=latencies,
    )


def dnsperf(
    registry: ProcessRegistry,
    settings: Settings,
    port: int,
    data: Path,
    seconds: float,
    *,
    rate: int | None = None,
    verbose: bool = False,
    one_pass: bool = False,
    clients: int | None = None,
    outstanding: int | None = None,
) -> DnsperfResult:
    """Run dnsperf on CPU 1 against 127.0.0.1:port for at most `seconds` (and one pass if one_pass)."""
    cmd = [
        "taskset",
        "-c",
        LOADGEN_CPU,
        "dnsperf",
        "-s",
        LOOPBACK,
        "-p",
        str(port),
        "-d",
        str(data),
        "-l",
        f"{seconds:g}",
        "-c",
        str(clients or settings.clients),
        "-q",
        str(outstanding or settings.outstanding),
        "-t",
        f"{settings.timeout:g}",
    ]
    if rate is not None:
        cmd += ["-Q", str(rate)]
    if verbose:
        cmd.append("-v")
    if one_pass:
        cmd += ["-n", "1"]
    output = registry.run(cmd, timeout=seconds + settings.timeout + 30)
    return parse_dnsperf(output, verbose)


def percentile(values: list[float], fraction: float, missing: int) -> float:
    """Nearest-rank percentile, counting `missing` (lost) queries as infinitely slow."""
    total = len(values) + missing
    if total == 0:
        return math.nan
    rank = math.ceil(fraction * total)
    ordered = sorted(values)
    return ordered[rank - 1] if rank <= len(ordered) else math.inf


# --------------------------------------------------------------------------------------------
# Measurements.


def ndots_cold_warm(server: RunningServer, knot: Knot, names: Sequence[str]) -> tuple[float, float]:
    """Upstream queries per external lookup on a cold cache, then on the warm one, as a pod sends them."""

    def lookups() -> int:
        before = knot.query_count()
        for name in names:
            for qname in ndots_lookup(name):
                # glibc sends A and AAAA of one candidate together and waits for both.
                ask(server.port, [(qname, QTYPE_A), (qname, QTYPE_AAAA)], 2.0)
        return knot.query_count() - before

    cold = lookups()
    warm = lookups()
    return cold / len(names), warm / len(names)


def measure(
    registry: ProcessRegistry, settings: Settings, knot: Knot, spec: ServerSpec, workload: Workload, directory: Path
) -> RunResult:
    """Start a fresh server, run the workload's phases against it, stop it, and return the numbers."""
    server = RunningServer(registry, spec, directory, knot.port)
    try:
        cold = warm = None
        if workload.name == "ndots":
            cold, warm = ndots_cold_warm(server, knot, [f"ext-{n}.example.com" for n in range(100, 120)])
        if workload.warm_up:
            # Gently (few in flight), so no warm-up query is dropped and every name gets cached.
            dnsperf(registry, settings, server.port, workload.qps_file, 30, one_pass=True, clients=1, outstanding=10)
        upstream_before = knot.query_count()
        cpu_before = process_cpu_seconds(server.pid)
        core_before = cpu_busy_ticks(LOADGEN_CPU)
        server_core_before = cpu_busy_ticks(SERVER_CPU)
        started = time.monotonic()
        peak = dnsperf(
            registry, settings, server.port, workload.qps_file, settings.qps_seconds, one_pass=workload.one_pass
        )
        wall = time.monotonic() - started
        cpu_used = process_cpu_seconds(server.pid) - cpu_before
        core_after = cpu_busy_ticks(LOADGEN_CPU)
        server_core_after = cpu_busy_ticks(SERVER_CPU)
        upstream = knot.query_count() - upstream_before
        if not server.alive():
            raise ServerStartError(f"{spec.name} died during the max-qps run\n{log_tail(server.log_path)}")
        fixed = dnsperf(
            registry,
            settings,
            server.port,
            workload.latency_file,
            settings.latency_seconds,
            rate=settings.latency_rate,
            verbose=True,
            one_pass=workload.one_pass,
        )
        if not server.alive():
            raise ServerStartError(f"{spec.name} died during the fixed-rate run\n{log_tail(server.log_path)}")
        peak_rss_kb = read_status_kb(server.pid, "VmHWM")
    finally:
        server.stop()
    ideal = ideal_upstream(workload.queries, peak.sent, peak.run_seconds, workload.warm_up)
    if workload.name == "miss":
        ideal = peak.sent
    completed = max(peak.completed, 1)
    return RunResult(
        qps=peak.qps,
        avg_ms=fixed.avg_latency * 1000,
        p99_ms=percentile(fixed.latencies, 0.99, fixed.sent - len(fixed.latencies)) * 1000,
        lost_max=peak.lost,
        lost_fixed=fixed.lost,
        peak_rss_mb=peak_rss_kb / 1024,
        upstream_per_1k=upstream * 1000 / completed,
        ideal_per_1k=ideal * 1000 / max(peak.sent, 1),
        server_cpu_pct=100 * cpu_used / wall,
        loadgen_cpu_pct=100 * (core_after[0] - core_before[0]) / max(core_after[1] - core_before[1], 1),
        # CPU 0 time not spent by the server: other processes on the machine disturbing the measurement.
        other_cpu0_pct=max(
            0.0,
            100 * (server_core_after[0] - server_core_before[0]) / max(server_core_after[1] - server_core_before[1], 1)
            - 100 * cpu_used / wall,
        ),
        cold_per_lookup=cold,
        warm_per_lookup=warm,
    )


@dataclasses.dataclass
class MemoryResult:
    """RSS of one server before and after caching fill_count distinct answers."""

    idle_mb: float
    filled_mb: float
    filled_anon_mb: float
    peak_mb: float
    upstream_fill: int
    upstream_second_pass: int
    fill_seconds: float


def measure_memory(
    registry: ProcessRegistry, settings: Settings, knot: Knot, spec: ServerSpec, fill_file: Path, directory: Path
) -> MemoryResult:
    """Fill a fresh server with distinct names, check a second pass is answered from cache, read RSS."""
    server = RunningServer(registry, spec, directory, knot.port)
    try:
        idle_kb = read_status_kb(server.pid, "VmRSS")
        before = knot.query_count()
        started = time.monotonic()
        dnsperf(registry, settings, server.port, fill_file, settings.fill_seconds, one_pass=True)
        fill_seconds = time.monotonic() - started
        middle = knot.query_count()
        filled_kb = read_status_kb(server.pid, "VmRSS")
        # File-backed pages (Knot Resolver's LMDB cache is an mmap'ed file) count in RSS but not in RssAnon.
        filled_anon_kb = read_status_kb(server.pid, "RssAnon")
        dnsperf(registry, settings, server.port, fill_file, settings.fill_seconds, one_pass=True)
        after = knot.query_count()
        peak_kb = read_status_kb(server.pid, "VmHWM")
    finally:
        server.stop()
    return MemoryResult(
        idle_mb=idle_kb / 1024,
        filled_mb=filled_kb / 1024,
        filled_anon_mb=filled_anon_kb / 1024,
        peak_mb=peak_kb / 1024,
        upstream_fill=middle - before,
        upstream_second_pass=after - middle,
        fill_seconds=fill_seconds,
    )


# --------------------------------------------------------------------------------------------
# Reporting.


def proxy_revision() -> str:
    """The checked-out commit of the proxy (with '+changes' when the work tree differs)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "no commit") + ("+changes" if dirty else "")


def machine_lines() -> list[str]:
    """Date, CPU, kernel and tool versions, for the top of the report."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(cmd: list[str], pattern: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        match = re.search(pattern, out.stdout + out.stderr)
        return match.group(1) if match else "unknown"

    knotd = version(["knotd", "-V"], r"version (\S+)")
    unbound = version([find_binary("unbound") or "unbound", "-V"], r"Version (\S+)")
    dnsmasq = version([find_binary("dnsmasq") or "dnsmasq", "--version"], r"version (\S+)")
    kresd = version([find_binary("kresd") or "kresd", "--version"], r"(\d+\.\d+\.\d+)")
    dnsperf_version = version(["dnsperf", "-h"], r"Version (\S+)")
    return [
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: nproc={os.cpu_count()}, CPU model: {model}, kernel {platform.release()} ({platform.machine()})",
        f"python: {platform.python_version()} ({sys.executable}); proxy at {proxy_revision()}",
        f"versions: knotd {knotd}, unbound {unbound}, dnsmasq {dnsmasq}, kresd {kresd}, dnsperf {dnsperf_version}",
    ]


def median(values: list[float]) -> float:
    """Median that ignores NaN (a run that produced no number)."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def median_result(results: list[RunResult]) -> RunResult:
    """Field-by-field median over repeats."""
    fields = {}
    for field in dataclasses.fields(RunResult):
        values = [getattr(r, field.name) for r in results]
        if any(v is None for v in values):
            fields[field.name] = None
        else:
            fields[field.name] = median([float(v) for v in values])
    return RunResult(**fields)


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for the tables."""
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "lost>1%"
    return f"{value:,.{digits}f}"


COLUMNS = (
    "server",
    "qps",
    "avg ms @5k",
    "p99 ms @5k",
    "lost max/5k",
    "peak RSS MB",
    "upstream/1k",
    "ideal/1k",
    "srv CPU%",
    "CPU1 busy%",
    "other CPU0%",
)


def result_row(name: str, result: RunResult) -> list[str]:
    """One table row of a server's median numbers."""
    return [
        name,
        fmt(result.qps, 0),
        fmt(result.avg_ms, 3),
        fmt(result.p99_ms, 3),
        f"{fmt(result.lost_max, 0)}/{fmt(result.lost_fixed, 0)}",
        fmt(result.peak_rss_mb, 1),
        fmt(result.upstream_per_1k, 1),
        fmt(result.ideal_per_1k, 1),
        fmt(result.server_cpu_pct, 0),
        fmt(result.loadgen_cpu_pct, 0),
        fmt(result.other_cpu0_pct, 0),
    ]


def ratio(a: float, b: float) -> str:
    """a / b as '0.62x'."""
    if b == 0 or math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
        return "-"
    return f"{a / b:.2f}x"


def ratio_row(anchor: str, proxy: RunResult, other: RunResult) -> list[str]:
    """The proxy's numbers divided by an anchor's (higher is better for qps, lower for the rest)."""
    return [
        f"proxy/{anchor}",
        ratio(proxy.qps, other.qps),
        ratio(proxy.avg_ms, other.avg_ms),
        ratio(proxy.p99_ms, other.p99_ms),
        "",
        ratio(proxy.peak_rss_mb, other.peak_rss_mb),
        ratio(proxy.upstream_per_1k, other.upstream_per_1k),
        "",
        "",
        "",
        "",
    ]


def print_table(rows: list[list[str]], header: Sequence[str]) -> None:
    """A plain aligned text table."""
    widths = [max(len(str(row[i])) for row in [list(header), *rows]) for i in range(len(header))]
    print(
        "  " + "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    )
    for row in rows:
        print(
            "  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )


def markdown(rows: list[list[str]], header: Sequence[str]) -> str:
    """A Markdown table."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main.


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, short runs (about 3 minutes)")
    parser.add_argument("--workloads", default=",".join(ALL_WORKLOADS), help="comma list of " + ",".join(ALL_WORKLOADS))
    parser.add_argument(
        "--servers", default=None, help="comma list of " + ",".join(ALL_SERVERS) + " (default: all that are installed)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement, median reported (3)")
    parser.add_argument("--qps-seconds", type=float, default=None, help="length of each max-qps run (8; quick 3)")
    parser.add_argument("--latency-seconds", type=float, default=None, help="length of each 5k q/s run (5; quick 2)")
    parser.add_argument("--latency-rate", type=int, default=5000, help="fixed rate of the latency runs (5000 q/s)")
    parser.add_argument("--clients", type=int, default=4, help="dnsperf -c: client sockets (4)")
    parser.add_argument("--outstanding", type=int, default=128, help="dnsperf -q: queries in flight (128)")
    parser.add_argument("--timeout", type=float, default=1.0, help="dnsperf -t: seconds before a query counts lost (1)")
    parser.add_argument("--fill", type=int, default=100_000, help="distinct names cached for the memory measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument(
        "--memory-servers", default=None, help="servers to fill for the memory measurement (default: all; quick: proxy)"
    )
    return parser.parse_args(argv)


def choose_servers(requested: str | None) -> tuple[list[str], list[str]]:
    """The servers to run and notes about those left out."""
    notes = []
    names = [s.strip() for s in requested.split(",")] if requested else list(ALL_SERVERS)
    chosen = []
    for name in names:
        if name not in SERVER_SPECS:
            raise SystemExit(f"unknown server {name!r}; choose from {', '.join(ALL_SERVERS)}")
        reason = SERVER_SPECS[name].available()
        if reason is None:
            chosen.append(name)
        elif requested or name != "kresd":  # Knot Resolver is optional: skipped silently unless asked for.
            notes.append(f"skipping {name}: {reason}")
    return chosen, notes


def background_load(seconds: float) -> tuple[float, float]:
    """Busy percent of CPU 0 and CPU 1 over `seconds`, before anything of ours runs."""
    before = cpu_busy_ticks(SERVER_CPU), cpu_busy_ticks(LOADGEN_CPU)
    time.sleep(seconds)
    after = cpu_busy_ticks(SERVER_CPU), cpu_busy_ticks(LOADGEN_CPU)
    busy = [100 * (a[0] - b[0]) / max(a[1] - b[1], 1) for a, b in zip(after, before, strict=True)]
    return busy[0], busy[1]


def check_machine() -> None:
    """Fail early if the tools or the two CPUs the method needs are missing."""
    for tool in ("taskset", "dnsperf", "knotd", "knotc"):
        if find_binary(tool) is None:
            raise SystemExit(f"{tool} is not installed (see bench/README.md)")
    if not {0, 1} <= os.sched_getaffinity(0):
        raise SystemExit("CPUs 0 and 1 must both be available: the server runs on 0, dnsperf and knotd on 1")


def run(args: argparse.Namespace, registry: ProcessRegistry, directory: Path) -> None:
    """The whole benchmark."""
    quick = args.quick
    memory_servers = None
    if args.memory_servers:
        memory_servers = tuple(s.strip() for s in args.memory_servers.split(","))
    elif quick:
        memory_servers = ("proxy",)
    settings = Settings(
        repeats=args.repeats or (1 if quick else 3),
        qps_seconds=args.qps_seconds or (3.0 if quick else 8.0),
        latency_seconds=args.latency_seconds or (2.0 if quick else 5.0),
        latency_rate=args.latency_rate,
        clients=args.clients,
        outstanding=args.outstanding,
        timeout=args.timeout,
        fill_count=args.fill,
        fill_seconds=30.0 if quick else 60.0,
        memory_servers=memory_servers,
    )
    workload_names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for name in workload_names:
        if name not in ALL_WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(ALL_WORKLOADS)}")
    servers, notes = choose_servers(args.servers)

    print("# kube-dns-proxy benchmark")
    for line in machine_lines():
        print(line)
    for note in notes:
        print(note)
    print(
        f"method: server on CPU {SERVER_CPU}, dnsperf + knotd on CPU {LOADGEN_CPU}; fresh server process per "
        f"workload and repeat; max qps: dnsperf -l {settings.qps_seconds:g} -c {settings.clients} "
        f"-q {settings.outstanding} -t {settings.timeout:g}; latency: dnsperf -Q {settings.latency_rate} "
        f"-l {settings.latency_seconds:g} -v (p99 from per-query latencies, lost counted as infinite); "
        f"median of {settings.repeats}"
    )
    print(f"servers: {', '.join(servers) or 'none'}; workloads: {', '.join(workload_names)}")
    if not servers:
        raise SystemExit("no server to measure")
    sys.stdout.flush()

    background = background_load(1.0)
    print(f"background load before start: CPU 0 {background[0]:.0f}% busy, CPU 1 {background[1]:.0f}% busy")
    if max(background) > 5:
        print("warning: the machine is not idle; numbers will be noisy (see the other CPU0% column)")
    knot = Knot(registry, directory / "knot")
    knot.start()
    print(f"knotd on {LOOPBACK}:{knot.port}: zones loaded, mod-stats query counter verified")
    workloads = build_workloads(directory, workload_names, settings)
    failed: dict[str, str] = {}
    medians: dict[str, dict[str, RunResult]] = {}
    for name in workload_names:
        workload = workloads[name]
        print(f"\n## {WORKLOAD_TITLES[name]}")
        print(f"  {describe(workload)}")
        runs: dict[str, list[RunResult]] = {s: [] for s in servers}
        for repeat in range(settings.repeats):
            # Rotate the order so no server always runs first (or right after a given other one).
            order = servers[repeat % len(servers) :] + servers[: repeat % len(servers)]
            for server_name in order:
                if server_name in failed:
                    continue
                try:
                    result = measure(registry, settings, knot, SERVER_SPECS[server_name], workload, directory)
                except ServerStartError as exc:
                    failed[server_name] = str(exc)
                    print(f"  {server_name} FAILED: {exc}")
                    continue
                runs[server_name].append(result)
                print(
                    f"  repeat {repeat + 1} {server_name:8s} qps={result.qps:,.0f} avg={result.avg_ms:.3f}ms "
                    f"p99={fmt(result.p99_ms, 3)}ms lost={result.lost_max}/{result.lost_fixed} "
                    f"rss={result.peak_rss_mb:.1f}MB upstream/1k={result.upstream_per_1k:.1f} "
                    f"cpu={result.server_cpu_pct:.0f}% other-cpu0={result.other_cpu0_pct:.0f}%"
                )
                if result.other_cpu0_pct > 5:
                    print(f"    warning: other processes used {result.other_cpu0_pct:.0f}% of CPU 0 during this run")
                sys.stdout.flush()
        medians[name] = {s: median_result(r) for s, r in runs.items() if r}
        print_workload(name, medians[name])

    memory: dict[str, MemoryResult] = {}
    if not args.no_memory:
        fill_file = write_queries(
            directory / "fill.txt", ((f"f{n}.fill.cluster.local", "A") for n in range(settings.fill_count))
        )
        targets = [s for s in servers if s not in failed and (memory_servers is None or s in memory_servers)]
        print(f"\n## memory: RSS after caching {settings.fill_count:,} distinct names (one A answer each)")
        for server_name in targets:
            try:
                memory[server_name] = measure_memory(
                    registry, settings, knot, SERVER_SPECS[server_name], fill_file, directory
                )
            except ServerStartError as exc:
                failed[server_name] = str(exc)
                print(f"  {server_name} FAILED: {exc}")
        print_memory(memory, settings.fill_count)

    print_markdown(medians, memory, settings, servers)
    for server_name, error in failed.items():
        print(f"\n{server_name} failed: {error}")


def workload_rows(results: dict[str, RunResult]) -> list[list[str]]:
    """Rows of one workload's table, the proxy's ratios to each anchor last."""
    rows = [result_row(s, r) for s, r in results.items()]
    if "proxy" in results:
        rows += [ratio_row(a, results["proxy"], results[a]) for a in ANCHORS if a in results]
        if "proxy-nometrics" in results:
            # The cost of metrics: proxy with them over proxy without.
            rows.append(ratio_row("proxy-nometrics", results["proxy"], results["proxy-nometrics"]))
    return rows


def print_workload(name: str, results: dict[str, RunResult]) -> None:
    """The side-by-side table of one workload (medians)."""
    if not results:
        return
    print(f"\n  {name}: medians")
    print_table(workload_rows(results), COLUMNS)
    if name == "ndots":
        for server_name, result in results.items():
            print(
                f"  {server_name}: upstream queries per pod lookup (8 client queries): "
                f"cold {fmt(result.cold_per_lookup, 2)}, warm {fmt(result.warm_per_lookup, 2)}"
            )
    sys.stdout.flush()


MEMORY_COLUMNS = (
    "server",
    "RSS idle MB",
    "RSS filled MB",
    "anon filled MB",
    "peak RSS MB",
    "upstream fill",
    "upstream 2nd pass",
    "fill s",
)


def memory_rows(memory: dict[str, MemoryResult]) -> list[list[str]]:
    """Rows of the memory table."""
    return [
        [
            s,
            fmt(m.idle_mb),
            fmt(m.filled_mb),
            fmt(m.filled_anon_mb),
            fmt(m.peak_mb),
            f"{m.upstream_fill:,}",
            f"{m.upstream_second_pass:,}",
            fmt(m.fill_seconds),
        ]
        for s, m in memory.items()
    ]


def print_memory(memory: dict[str, MemoryResult], fill_count: int) -> None:
    """The memory table; a second pass with ~0 upstream queries shows the entries were really cached."""
    if memory:
        print_table(memory_rows(memory), MEMORY_COLUMNS)
        for server_name, result in memory.items():
            if result.upstream_fill < fill_count * 0.99:
                print(f"  note: {server_name} forwarded only {result.upstream_fill:,} of {fill_count:,} fill queries")


def print_markdown(
    medians: dict[str, dict[str, RunResult]], memory: dict[str, MemoryResult], settings: Settings, servers: list[str]
) -> None:
    """The tables again in Markdown, ready for the README."""
    print("\n## Markdown (paste into README.md)\n")
    for line in machine_lines():
        print(f"- {line}")
    print(
        f"- median of {settings.repeats}; max qps over {settings.qps_seconds:g} s "
        f"(`dnsperf -c {settings.clients} -q {settings.outstanding}`); latency at {settings.latency_rate:,} q/s over "
        f"{settings.latency_seconds:g} s\n"
    )
    header = ("workload", *COLUMNS)
    rows = []
    for name, results in medians.items():
        rows += [[name, *row] for row in workload_rows(results)]
    if rows:
        print(markdown(rows, header))
    if "ndots" in medians:
        print(
            "\nUpstream queries per pod lookup of an external name (ndots:5, 3 search domains, A+AAAA = 8 queries):\n"
        )
        print(
            markdown(
                [[s, fmt(r.cold_per_lookup, 2), fmt(r.warm_per_lookup, 2)] for s, r in medians["ndots"].items()],
                ("server", "cold", "warm"),
            )
        )
    if memory:
        print(f"\nMemory with {settings.fill_count:,} cached names:\n")
        print(markdown(memory_rows(memory), MEMORY_COLUMNS))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, and always stop every child and remove the temp dir."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_machine()
    registry = ProcessRegistry()

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    directory = Path(tempfile.mkdtemp(prefix="kube-dns-proxy-bench-"))
    started = time.monotonic()
    try:
        run(args, registry, directory)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process started", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        # Ignore a second Ctrl-C while stopping children: leaving them running is worse.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        registry.stop_all()
        shutil.rmtree(directory, ignore_errors=True)
        print(f"\nelapsed: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
