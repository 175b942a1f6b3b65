"""--autopath seen from a pod: glibc and Go resolvers, ndots:5 and the Kubernetes search list, in network namespaces.

Topology, only link-local addresses, in namespaces the module creates and deletes:

  [pod] p0 169.254.102.2 --veth-- n0 169.254.102.1 [node]: proxy.py on 169.254.102.1:53,
        resolv.conf: search default.svc.cluster.local      Knot (the kube-dns stand-in) on 127.0.0.1
        svc.cluster.local cluster.local corp.example.net,   serving cluster.local, example.com (the
        options ndots:5                                    "external" zone), corp.example.net (the
                                                           node's search domain) and the root zone

Every lookup is made twice per resolver and mode, cold (the proxy's cache purged) and warm, against
the proxy without and with --autopath; the pod's queries are counted at the proxy (--log-queries).
Records hold documentation addresses only (192.0.2.0/24, 2001:db8::/32). Run as a script, this
file is the pod's glibc lookup (``getaddrinfo NAME``): addresses and seconds as one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from servers import _knot_binary

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
POD_IP = "169.254.102.2"
NODE_IP = "169.254.102.1"
POD_V6 = "2001:db8:102::2/64"  # global scope: glibc's AI_ADDRCONFIG then asks AAAA too (as on a dual-stack pod)
KNOT_PORT = 5353
HTTP_PORT = 9153
NODE_SEARCH = "corp.example.net"
CLUSTER_SEARCH = "default.svc.cluster.local svc.cluster.local cluster.local"
# The pod's resolv.conf as the kubelet writes it (ClusterFirst), on a node whose own resolv.conf has
# one search domain, and on a node with none; the node's resolv.conf gives the proxy its --search.
LAYOUTS = {
    "node-domain": (
        f"nameserver {NODE_IP}\nsearch {CLUSTER_SEARCH} {NODE_SEARCH}\noptions ndots:5 timeout:2 attempts:2\n",
        f"nameserver 127.0.0.1\nsearch {NODE_SEARCH}\n",
    ),
    "cluster-only": (
        f"nameserver {NODE_IP}\nsearch {CLUSTER_SEARCH}\noptions ndots:5 timeout:2 attempts:2\n",
        "nameserver 127.0.0.1\n",
    ),
}
REPEATS = 3  # each lookup, cold and warm; the table gives the median time

ZONES = {
    "cluster.local.": """\
@ 5 SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5
@ 30 NS ns.dns.cluster.local.
ns.dns 30 A 192.0.2.53
web.default.svc 30 A 192.0.2.20
web.default.svc 30 AAAA 2001:db8::20
db.staging.svc 30 A 192.0.2.21
web-0.nginx.default.svc 30 A 192.0.2.22
""",
    "example.com.": """\
@ 30 SOA ns.example.com. hostmaster.example.com. 1 7200 1800 86400 30
@ 30 NS ns.example.com.
ns 30 A 192.0.2.53
www 60 A 192.0.2.10
www 60 AAAA 2001:db8::10
alias 60 CNAME www.example.com.
a.b.c.d.e 60 A 192.0.2.40
""",
    "corp.example.net.": """\
@ 30 SOA ns.corp.example.net. hostmaster.corp.example.net. 1 7200 1800 86400 30
@ 30 NS ns.corp.example.net.
ns 30 A 192.0.2.53
api 60 A 192.0.2.30
db 60 A 192.0.2.31
""",
    ".": """\
@ 30 SOA ns.root.example. hostmaster.root.example. 1 7200 1800 86400 30
@ 30 NS ns.root.example.
""",
}

# What the pod looks up, by kind.
LOOKUPS = {
    "web": "cluster short name",
    "db.staging": "cluster short name, other namespace",
    "web.default.svc": "partial cluster name",
    "web.default.svc.cluster.local": "svc.cluster.local name",
    "www.example.com": "external",
    "alias.example.com": "external, CNAME",
    "api": "node search domain",
    "nothing-here": "exists nowhere",
    "missing.example.com": "exists nowhere",
    "db.nowhere": "exists nowhere (db.corp.example.net does)",
    "web-0.nginx.default.svc.cluster.local": "5 dots, exists",
    "a.b.c.d.e.example.com": "6 dots, exists",
    "x.y.z.w.v.nowhere.example.com": "6 dots, exists nowhere",
}
EXTERNAL = ("www.example.com", "alias.example.com")

GO_LOOKUP = """\
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"time"
)

// One lookup with Go's own resolver (no cgo): addresses and seconds as one JSON line.
func main() {
	r := &net.Resolver{PreferGo: true}
	start := time.Now()
	addrs, err := r.LookupHost(context.Background(), os.Args[1])
	seconds := time.Since(start).Seconds()
	sort.Strings(addrs)
	if err != nil {
		addrs = []string{}
	}
	fmt.Printf("{\\"addresses\\": [%s], \\"seconds\\": %f}\\n", quote(addrs), seconds)
}

func quote(items []string) string {
	out := make([]string, len(items))
	for i, item := range items {
		out[i] = "\\"" + item + "\\""
	}
	return strings.Join(out, ", ")
}
"""


def _run(argv: list[str], timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll predicate every 50 ms for at most ``timeout`` seconds; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting until {what}")


@dataclass
class Result:
    """One lookup: the addresses the resolver returned, its time and the queries the pod sent."""

    addresses: list[str]
    seconds: float
    queries: int


class AutopathLab:
    """A pod and a node namespace, Knot and the proxy in the node; lookups from the pod."""

    def __init__(self, workdir: Path) -> None:
        suffix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.pod = f"kdp-appod-{suffix}"
        self.node = f"kdp-apnode-{suffix}"
        self.workdir = workdir
        self.created: list[str] = []
        self.knot: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        self.proxy_log: Path | None = None
        self.go_binary: Path | None = None

    def sh(self, ns: str, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check)

    def setup(self) -> None:
        for ns in (self.pod, self.node):
            _run(["ip", "netns", "add", ns])
            self.created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.use_layout("node-domain")
        for args in (
            ["-n", self.node, "link", "add", "n0", "type", "veth", "peer", "name", "p0", "netns", self.pod],
            ["-n", self.node, "addr", "add", f"{NODE_IP}/30", "dev", "n0"],
            ["-n", self.pod, "addr", "add", f"{POD_IP}/30", "dev", "p0"],
            ["-n", self.pod, "-6", "addr", "add", POD_V6, "dev", "p0", "nodad"],
            ["-n", self.node, "link", "set", "n0", "up"],
            ["-n", self.pod, "link", "set", "p0", "up"],
        ):
            _run(["ip", *args])
        self.start_knot()

    def use_layout(self, layout: str) -> None:
        """Write the pod's and the node's resolv.conf (ip netns exec mounts them over /etc/resolv.conf)."""
        for ns, text in zip((self.pod, self.node), LAYOUTS[layout], strict=True):
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(text)

    def start_knot(self) -> None:
        knot_dir = self.workdir / "knot"
        knot_dir.mkdir()
        zones = []
        for zone, text in ZONES.items():
            file_name = "root.zone" if zone == "." else f"{zone.rstrip('.')}.zone"
            (knot_dir / file_name).write_text(f"$ORIGIN {zone}\n{text}")
            zones.append(f'  - domain: "{zone}"\n    file: "{knot_dir / file_name}"')
        config = knot_dir / "knot.conf"
        config.write_text(
            f"""server:
    rundir: "{knot_dir}"
    listen: 127.0.0.1@{KNOT_PORT}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: warning
database:
    storage: "{knot_dir}"
template:
  - id: default
    storage: "{knot_dir}"
    zonefile-sync: -1
    journal-content: none
zone:
"""
            + "\n".join(zones)
            + "\n"
        )
        with open(self.workdir / "knot.log", "wb") as log:
            self.knot = subprocess.Popen(
                ["ip", "netns", "exec", self.node, _knot_binary("knotd"), "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def answers() -> bool:
            if self.knot is not None and self.knot.poll() is not None:
                raise AssertionError(f"knotd exited: {(self.workdir / 'knot.log').read_text()[-2000:]}")
            out = self.sh(
                self.node, "dig", "@127.0.0.1", "-p", str(KNOT_PORT), "+time=1", "+tries=1", "+short",
                "www.example.com", "A", check=False,
            ).stdout  # fmt: skip
            return "192.0.2.10" in out

        wait_for(answers, 10, "Knot answers in the node namespace")

    def start_proxy(self, autopath: bool) -> None:
        self.stop_proxy()
        name = "proxy-autopath" if autopath else "proxy-plain"
        self.proxy_log = self.workdir / f"{name}.log"
        argv = [
            sys.executable, str(ROOT / "proxy.py"), "--listen", f"{NODE_IP}:53",
            "--upstream", f"127.0.0.1:{KNOT_PORT}", "--http", f"127.0.0.1:{HTTP_PORT}",
            "--log-level", "debug", "--log-queries", "--summary-interval", "0",
        ]  # fmt: skip
        if autopath:
            argv.append("--autopath")
        with open(self.proxy_log, "wb") as log:
            self.proxy = subprocess.Popen(
                ["ip", "netns", "exec", self.node, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        log_path = self.proxy_log

        def serving() -> bool:
            if self.proxy is not None and self.proxy.poll() is not None:
                raise AssertionError(f"proxy exited: {log_path.read_text()[-2000:]}")
            return '"event": "serving"' in log_path.read_text()

        wait_for(serving, 15, "the proxy serves")

    def stop_proxy(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait(timeout=10)
        self.proxy = None

    def purge(self) -> None:
        """Empty the proxy's cache (POST /cache/purge?all=1, loopback only: run in the node namespace)."""
        code = (
            "import urllib.request; urllib.request.urlopen(urllib.request.Request("
            f"'http://127.0.0.1:{HTTP_PORT}/cache/purge?all=1', method='POST'), timeout=5).read()"
        )
        self.sh(self.node, sys.executable, "-c", code)

    def pod_queries(self) -> int:
        """The queries the proxy has received so far (one --log-queries line each)."""
        assert self.proxy_log is not None
        count = 0
        for line in self.proxy_log.read_text().splitlines():
            if '"event": "query"' in line:
                count += 1
        return count

    def lookup(self, resolver: str, name: str) -> Result:
        """One lookup from the pod with glibc (getaddrinfo) or Go; the queries it cost, counted at the proxy."""
        before = self.pod_queries()
        if resolver == "glibc":
            argv = [sys.executable, str(THIS), "getaddrinfo", name]
        else:
            assert self.go_binary is not None
            argv = [str(self.go_binary), name]
        out = json.loads(self.sh(self.pod, *argv).stdout)
        # The proxy logs a query after answering it: wait for the last line of this lookup.
        time.sleep(0.05)
        return Result(sorted(out["addresses"]), out["seconds"], self.pod_queries() - before)

    def getent(self, name: str) -> list[str]:
        """The addresses `getent ahosts` prints in the pod (glibc, the pod's resolv.conf)."""
        proc = self.sh(self.pod, "getent", "ahosts", name, check=False)
        return sorted({line.split()[0] for line in proc.stdout.splitlines() if line.strip()})

    def close(self) -> None:
        self.stop_proxy()
        if self.knot is not None and self.knot.poll() is None:
            self.knot.terminate()
            try:
                self.knot.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.knot.kill()
                self.knot.wait(timeout=10)
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def build_go_lookup(workdir: Path) -> Path:
    """Build the Go lookup program with Debian's golang-go (dev.sh installs it); no network, no cgo."""
    go = shutil.which("go") or shutil.which("go", path="/usr/lib/go/bin")
    if go is None:
        pytest.fail("go not found: run ./dev.sh setup (Debian package golang-go)")
    source = workdir / "lookup.go"
    source.write_text(GO_LOOKUP)
    binary = workdir / "go-lookup"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "GOCACHE": str(workdir / "gocache"),
        "GOPATH": str(workdir / "gopath"),
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
    }
    _run([go, "build", "-o", str(binary), str(source)], timeout=300, env=env, cwd=workdir)
    return binary


Key = tuple[str, str, bool, str, str]  # layout, resolver, --autopath, name, "cold" or "warm"


@dataclass
class Measured:
    """Every lookup, REPEATS times each; getent's addresses by (--autopath, name)."""

    results: dict[Key, list[Result]]
    getent: dict[tuple[bool, str], list[str]]

    def addresses(self, key: Key) -> list[str]:
        found = {tuple(result.addresses) for result in self.results[key]}
        assert len(found) == 1, f"{key}: answers differ between repetitions: {found}"
        return list(found.pop())

    def queries(self, key: Key) -> int:
        counts = {result.queries for result in self.results[key]}
        assert len(counts) == 1, f"{key}: query counts differ between repetitions: {counts}"
        return counts.pop()

    def seconds(self, key: Key) -> float:
        return statistics.median(result.seconds for result in self.results[key])


def measure(lab: AutopathLab, layout: str, names: list[str], results: dict[Key, list[Result]]) -> None:
    """Each name from the pod with glibc and Go, cold (cache purged) then warm, without then with --autopath."""
    lab.use_layout(layout)
    for autopath in (False, True):
        lab.start_proxy(autopath)
        for resolver in ("glibc", "go"):
            for name in names:
                for _ in range(REPEATS):
                    lab.purge()
                    for state in ("cold", "warm"):
                        key = (layout, resolver, autopath, name, state)
                        results.setdefault(key, []).append(lab.lookup(resolver, name))


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Measured]:
    workdir = tmp_path_factory.mktemp("autopath-lab")
    lab = AutopathLab(workdir)
    try:
        lab.go_binary = build_go_lookup(workdir)
        lab.setup()
        results: dict[Key, list[Result]] = {}
        measure(lab, "cluster-only", list(EXTERNAL), results)
        measure(lab, "node-domain", list(LOOKUPS), results)
        getent: dict[tuple[bool, str], list[str]] = {}
        for autopath in (False, True):
            lab.start_proxy(autopath)
            for name in LOOKUPS:
                getent[(autopath, name)] = lab.getent(name)
        yield Measured(results, getent)
    finally:
        lab.close()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


class TestFromThePod:
    """The pod gets the same addresses with --autopath as without, sooner and with fewer queries."""

    @pytest.mark.parametrize("resolver", ["glibc", "go"])
    def test_same_addresses_with_and_without(self, measured: Measured, resolver: str) -> None:
        """Every lookup, cold and warm, returns the same addresses with --autopath as without."""
        for layout, _, autopath, name, state in measured.results:
            if autopath:
                walked = measured.addresses((layout, resolver, True, name, state))
                plain = measured.addresses((layout, resolver, False, name, state))
                assert walked == plain, f"{layout} {resolver} {name} {state}: {walked} != {plain}"

    def test_getent_ahosts_same_addresses(self, measured: Measured) -> None:
        """`getent ahosts` prints the same addresses with --autopath as without, and the expected ones."""
        for name in LOOKUPS:
            assert measured.getent[(True, name)] == measured.getent[(False, name)], name
        assert measured.getent[(True, "www.example.com")] == ["192.0.2.10", "2001:db8::10"]
        assert measured.getent[(True, "api")] == ["192.0.2.30"]
        assert measured.getent[(True, "db.nowhere")] == []

    def test_addresses_are_the_zones(self, measured: Measured) -> None:
        """Sanity: the lookups find what the zones hold, and nothing for names that exist nowhere."""
        expected = {
            "web": ["192.0.2.20", "2001:db8::20"],
            "db.staging": ["192.0.2.21"],
            "web.default.svc": ["192.0.2.20", "2001:db8::20"],
            "alias.example.com": ["192.0.2.10", "2001:db8::10"],
            "api": ["192.0.2.30"],
            "nothing-here": [],
            "db.nowhere": [],
            "web-0.nginx.default.svc.cluster.local": ["192.0.2.22"],
            "a.b.c.d.e.example.com": ["192.0.2.40"],
            "x.y.z.w.v.nowhere.example.com": [],
        }
        for name, addresses in expected.items():
            for resolver in ("glibc", "go"):
                assert measured.addresses(("node-domain", resolver, True, name, "cold")) == addresses, name

    @pytest.mark.parametrize("resolver", ["glibc", "go"])
    def test_external_lookup_costs_two_queries_instead_of_eight(self, measured: Measured, resolver: str) -> None:
        """With the kubelet's three cluster search domains, an external name costs the pod 8 queries
        without --autopath (4 candidates, A and AAAA), 2 with; 10 and 2 with one node search domain."""
        for layout, without in (("cluster-only", 8), ("node-domain", 10)):
            for name in EXTERNAL:
                for state in ("cold", "warm"):
                    assert measured.queries((layout, resolver, False, name, state)) == without, (layout, name)
                    assert measured.queries((layout, resolver, True, name, state)) == 2, (layout, name)

    def test_never_more_queries(self, measured: Measured) -> None:
        """No lookup costs the pod more queries with --autopath than without."""
        for layout, resolver, autopath, name, state in measured.results:
            if autopath:
                walked = measured.queries((layout, resolver, True, name, state))
                assert walked <= measured.queries((layout, resolver, False, name, state)), name

    def test_print_table(self, measured: Measured) -> None:
        """The measured table: queries per lookup and median cold/warm latency, without and with --autopath."""
        lines = [
            "| lookup | kind | resolver | pod's queries off → on | cold ms off → on | warm ms off → on |",
            "|---|---|---|---|---|---|",
        ]
        rows = [("cluster-only", name, "external, no node search domain") for name in EXTERNAL]
        rows += [("node-domain", name, kind) for name, kind in LOOKUPS.items()]
        for layout, name, kind in rows:
            for resolver in ("glibc", "go"):
                cells = []
                for state in ("cold", "warm"):
                    off, on = ((layout, resolver, mode, name, state) for mode in (False, True))
                    cells.append(f"{ms(measured.seconds(off))} → {ms(measured.seconds(on))}")
                queries = [measured.queries((layout, resolver, mode, name, "cold")) for mode in (False, True)]
                lines.append(f"| `{name}` | {kind} | {resolver} | {queries[0]} → {queries[1]} | {' | '.join(cells)} |")
        table = "\n".join(lines)
        print("\n" + table)
        out = os.environ.get("AUTOPATH_TABLE")
        if out:
            Path(out).write_text(table + "\n")
        assert len(lines) == 2 + 2 * len(rows)


def _getaddrinfo(name: str) -> None:
    """The pod side: one glibc getaddrinfo (AF_UNSPEC, as getent ahosts), printed as a JSON line."""
    start = time.perf_counter()
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
        addresses = sorted({str(info[4][0]) for info in infos})
    except socket.gaierror:
        addresses = []
    print(json.dumps({"addresses": addresses, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["getaddrinfo"]:
        _getaddrinfo(sys.argv[2])
