"""A scripted upstream outage served by a real proxy and scraped by a real Prometheus, all on 127.0.0.1.

tests/test_dashboard.py queries this Prometheus with every panel of dashboards/kube-dns-proxy.json
and dashboards/render_preview.py draws docs/dashboard.png from it: no PromQL is evaluated here.
Everything is bounded: the load by count and time, every wait by a deadline, every process is
stopped by its PID. The Prometheus listens on 127.0.0.1 only, keeps its storage in the run's
directory and scrapes nothing but the run's proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import dns.exception
import dns.message
import dns.query
import dnslib

from servers import FakeUpstream, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
ALERT_RULES = REPO_ROOT / "dashboards" / "alerts.rules.yaml"
JOB = "kube-dns-proxy"
SCRAPE_INTERVAL = 1.0  # seconds; also Grafana's "scrape interval" of the data source
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# kube-dns as a pod with ndots:5 sees it: SERVICES names answered with a short TTL, so that they
# are stale during the outage; everything else under cluster.local is NXDOMAIN (RFC 8020).
SERVICES = 40
HOT_TTL = 2  # seconds: services, PTRs and negative answers
OTHER_TTL = 300  # seconds: names outside the cluster, which fill the cache
CACHE_SIZE = 250
CLUSTER_SUFFIX = ".svc.cluster.local."
SERVICE_NAME = re.compile(r"(_http\._tcp\.)?svc-\d+\.default\.svc\.cluster\.local\.")
EXTERNAL = ("api.github.com", "registry.k8s.io", "s3.amazonaws.com", "pypi.org", "example.com")
SEARCH = ("default.svc.cluster.local.", "svc.cluster.local.", "cluster.local.")

# (upstream mode, seconds at speed 1): answering, silent (tries time out until it is marked
# down), closed (ICMP unreachable / RST), answering again.
PHASES: tuple[tuple[str, float], ...] = (("answer", 6.0), ("hang", 4.0), ("down", 6.0), ("answer", 6.0))


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its HTTP API answered with an error (the message is its own)."""


class Phase(NamedTuple):
    """One upstream mode of the run, in wall-clock seconds (Prometheus' time)."""

    mode: str
    start: float
    end: float


def grafana_interpolate(
    expr: str,
    variables: dict[str, list[str] | None],
    all_values: dict[str, str],
    step: float,
    scrape_interval: float = SCRAPE_INTERVAL,
) -> str:
    """Return expr with its template variables replaced the way Grafana's Prometheus data source does.

    variables: the selected values of each dashboard variable, None meaning "All". All becomes the
    variable's custom all value (all_values, e.g. ".*"), unescaped. Selected values of a multi-value
    variable are regex-escaped (a metacharacter gets two backslashes in the PromQL string, one in the
    regex) and joined as (a|b); one value alone has no parentheses. $__interval is the query step and
    $__rate_interval is max($__interval + scrape interval, 4 x scrape interval), Grafana's definition.
    Any other variable raises KeyError, so a new one cannot go unnoticed.
    """
    interval_ms = round(step * 1000)
    rate_interval_ms = round(max(step + scrape_interval, 4 * scrape_interval) * 1000)
    builtins = {"__interval": _duration(interval_ms), "__rate_interval": _duration(rate_interval_ms)}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in builtins:
            return builtins[name]
        selected = variables[name]
        if selected is None:
            return all_values[name]
        escaped = [re.sub(r"([$^*{}\[\]+?.()|])", r"\\\\\1", item.replace("\\", "\\\\\\\\")) for item in selected]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def _duration(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class Prometheus:
    """The `prometheus` binary on 127.0.0.1, its storage in workdir, scraping one target every second."""

    def __init__(self, target: str, workdir: Path, rule_files: Sequence[Path] = (ALERT_RULES,)) -> None:
        self.target = target
        self.workdir = workdir
        self.rule_files = list(rule_files)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        """The prometheus.yml: one scrape job for the proxy's /metrics; JSON is YAML."""
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL:g}s",
                "scrape_timeout": f"{SCRAPE_INTERVAL:g}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL:g}s",
            },
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [self.target]}]}],
        }
        return json.dumps(config, indent=2)

    def start(self) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError("no prometheus binary (Debian package prometheus; ./dev.sh setup installs it)")
        config = self.workdir / "prometheus.yml"
        config.write_text(self.config_text())
        self.port = free_port()
        log = (self.workdir / "prometheus.log").open("wb")
        with log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}: {self.log()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            time.sleep(0.1)
        self.stop()
        raise PrometheusError(f"prometheus not ready within {START_TIMEOUT} s: {self.log()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after STOP_TIMEOUT seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def api(self, path: str, params: dict[str, Any] | list[tuple[str, Any]]) -> Any:
        """GET /api/v1/PATH; return its "data", or raise PrometheusError with Prometheus' error text."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 bad_data (parse errors), 422 execution errors
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        """/api/v1/query: the instant vector of expr at time `at` (a scalar comes back as one series)."""
        data = self.api("query", {"query": expr, "time": f"{at:.3f}"})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """/api/v1/query_range: one {"metric", "values"} per series, values as [time, "text"] pairs."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        return self.api("query_range", params)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's label_values(match, label) asks: /api/v1/label/LABEL/values?match[]=..."""
        return self.api(f"label/{label}/values", [("match[]", match)])

    def wait_until(self, expr: str, timeout: float) -> None:
        """Poll until expr returns a series (e.g. the first scrape happened), at most timeout seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.query(expr, time.time()):
                return
            time.sleep(0.2)
        raise PrometheusError(f"{expr} returned nothing within {timeout} s: {self.log()[-2000:]}")


class ClusterUpstream(FakeUpstream):
    """A FakeUpstream answering like kube-dns: short-lived service names, NXDOMAIN for the search path."""

    def __init__(self) -> None:
        records = {}
        for index in range(SERVICES):
            service = f"svc-{index}.default{CLUSTER_SUFFIX}"
            records[(service, "A")] = [("A", f"10.96.1.{index + 1}", HOT_TTL)]
            records[(f"_http._tcp.{service}", "SRV")] = [("SRV", f"0 100 80 {service}", HOT_TTL)]
            records[(f"{index + 1}.1.96.10.in-addr.arpa.", "PTR")] = [("PTR", service, HOT_TTL)]
        super().__init__(ttl=OTHER_TTL, neg_ttl=HOT_TTL, records=records)

    def _reply(self, query: dnslib.DNSRecord, mode: str, transport: str) -> bytes | None:
        qname = str(query.q.qname).lower()
        if mode == "answer" and qname.endswith(".cluster.local.") and not SERVICE_NAME.fullmatch(qname):
            mode = "nxdomain"
        return super()._reply(query, mode, transport)


def query_mix(rng: random.Random, unique: Iterator[int]) -> tuple[str, str]:
    """One (qname, qtype): mostly service names, search-path NXDOMAINs, some names never asked before."""
    roll = rng.random()
    index = rng.randrange(SERVICES)
    service = f"svc-{index}.default{CLUSTER_SUFFIX}"
    external = EXTERNAL[rng.randrange(len(EXTERNAL))]
    if roll < 0.50:
        return service, "A"
    if roll < 0.62:
        return service, "AAAA"  # NODATA: an IPv4-only cluster
    if roll < 0.66:
        return f"_http._tcp.{service}", "SRV"
    if roll < 0.68:
        return f"{index + 1}.1.96.10.in-addr.arpa.", "PTR"
    if roll < 0.82:
        return f"{external}.{SEARCH[rng.randrange(len(SEARCH))]}", "A"  # NXDOMAIN (ndots:5)
    if roll < 0.90:
        return f"{external}.", "A"
    return f"u{next(unique)}.tenant.example.", "A"  # a miss; SERVFAIL while the upstream is out


def send_udp_load(address: tuple[str, int], rate: float, duration: float, stop: threading.Event) -> int:
    """Send the mix at `rate` queries/s for `duration` s, open loop (replies read and dropped); return the count.

    A burst of 8 identical new queries every 2 s (coalesced upstream) and a datagram too short for
    a header every 3 s (dropped as malformed). Bounded by count as well as time.
    """
    rng, unique = random.Random(53), iter(range(10**9))
    limit = int(rate * duration) + 100
    sent = 0
    start = time.monotonic()
    next_burst, next_garbage = start + 2.0, start + 3.0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        while not stop.is_set() and sent < limit and (now := time.monotonic()) - start < duration:
            batch = [query_mix(rng, unique) for _ in range(max(0, min(int((now - start) * rate) - sent, 50)))]
            if now >= next_burst:
                batch += [(f"deploy-{sent}.tenant.example.", "A")] * 8
                next_burst += 2.0
            for qname, qtype in batch:
                with contextlib.suppress(BlockingIOError):
                    sock.sendto(dnslib.DNSRecord.question(qname, qtype).pack(), address)
                sent += 1
            if now >= next_garbage:
                sock.sendto(b"\x00\x01", address)
                next_garbage += 3.0
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                for _ in range(1000):
                    sock.recv(65535)
            time.sleep(0.01)
    return sent


def send_tcp_load(address: tuple[str, int], duration: float, stop: threading.Event) -> int:
    """Ask a service name over TCP 4 times a second (clients retrying truncated answers); return the count."""
    sent = 0
    start = time.monotonic()
    while not stop.is_set() and sent < duration * 4 + 10 and time.monotonic() - start < duration:
        qname = f"svc-{sent % SERVICES}.default{CLUSTER_SUFFIX}"
        with contextlib.suppress(dns.exception.DNSException, OSError):
            dns.query.tcp(dns.message.make_query(qname, "A"), address[0], port=address[1], timeout=2)
        sent += 1
        stop.wait(0.25)
    return sent


class ScriptedRun:
    """ClusterUpstream, proxy.py and Prometheus on 127.0.0.1; play() drives the outage, the exit stops them.

    speed stretches the phases (speed 4: four times longer); rate is the UDP queries per second.
    """

    def __init__(self, workdir: Path, speed: float = 1.0, rate: float = 100.0) -> None:
        self.workdir = workdir
        self.speed = speed
        self.rate = rate
        self.upstream = ClusterUpstream()
        self.dns_port = self.http_port = 0
        self.proxy: subprocess.Popen[bytes] | None = None
        self.prometheus: Prometheus | None = None
        self.phases: list[Phase] = []

    @property
    def instance(self) -> str:
        """The proxy's scrape target, hence its `instance` label."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def start(self) -> float:
        return self.phases[0].start

    @property
    def end(self) -> float:
        return self.phases[-1].end

    def proxy_args(self) -> list[str]:
        """Short timeouts so the outage shows within seconds; a small cache so that it fills."""
        return [
            sys.executable, "proxy.py",
            "--listen", f"127.0.0.1:{self.dns_port}",
            "--upstream", self.upstream.address,
            "--http", self.instance,
            "--cache-size", str(CACHE_SIZE),
            "--upstream-timeout", "0.5",
            "--deadline", "1",
            "--stale-answer-timeout", "0.4",
            "--failure-recheck", "2",
            "--log-level", "warning",
        ]  # fmt: skip

    def __enter__(self) -> ScriptedRun:
        try:
            self.upstream.start()
            self.dns_port, self.http_port = free_port(), free_port()
            self._start_proxy()
            self.prometheus = Prometheus(self.instance, self.workdir).start()
            self.prometheus.wait_until(f'up{{job="{JOB}"}} == 1', timeout=10)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait(timeout=STOP_TIMEOUT)
        self.upstream.stop()

    def _start_proxy(self) -> None:
        # Flags from the caller's shell must not change the run.
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE_DNS_PROXY_")}
        with (self.workdir / "proxy.log").open("wb") as log:
            self.proxy = subprocess.Popen(
                self.proxy_args(),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proxy.poll() is not None:
                raise RuntimeError(f"proxy exited: {(self.workdir / 'proxy.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://{self.instance}/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.1)
        raise RuntimeError(f"proxy not ready within {START_TIMEOUT} s")

    def play(self, log: Any = None) -> None:
        """Run the phases under load, then wait until Prometheus holds a scrape taken after the last one."""
        duration = sum(seconds for _, seconds in PHASES) * self.speed
        address = ("127.0.0.1", self.dns_port)
        stop = threading.Event()
        loads = [
            threading.Thread(target=send_udp_load, args=(address, self.rate, duration + 1, stop), daemon=True),
            threading.Thread(target=send_tcp_load, args=(address, duration + 1, stop), daemon=True),
        ]
        for load in loads:
            load.start()
        try:
            for mode, seconds in PHASES:
                self._switch(mode)
                start = time.time()
                if log is not None:
                    print(f"upstream {mode} for {seconds * self.speed:g} s", file=log)
                time.sleep(seconds * self.speed)
                self.phases.append(Phase(mode, start, time.time()))
        finally:
            stop.set()
            for load in loads:
                load.join(timeout=STOP_TIMEOUT)
        assert self.prometheus is not None
        # The first scrape later than the run's end, so that query_range sees all of it.
        self.prometheus.wait_until(
            f'timestamp(kube_dns_proxy_cache_capacity_entries{{job="{JOB}"}}) > {self.end + SCRAPE_INTERVAL:.3f}',
            timeout=5 * SCRAPE_INTERVAL + 5,
        )

    def _switch(self, mode: str) -> None:
        """Set the upstream's mode; retry (10 times, 0.5 s apart) while its port cannot be rebound.

        Leaving "down" rebinds the same port; meanwhile the kernel may have lent it to another
        socket on the machine as an ephemeral source port (EADDRINUSE until that one closes).
        """
        for _ in range(10):
            try:
                self.upstream.mode = mode
                return
            except OSError:
                self.upstream.mode = "down"  # the failed switch left the mode set, the sockets closed
                time.sleep(0.5)
        raise RuntimeError(f"upstream could not switch to {mode}")
