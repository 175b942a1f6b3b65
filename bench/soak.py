"""Soak: a fixed query rate against the proxy for minutes while the upstream flaps; cached names must never fail.

Run by hand from anywhere: `python bench/soak.py [--duration 300] [--rate 500]`, or `--short` (about
20 s, what CI runs through tests/test_soak.py). All traffic stays on 127.0.0.1: the upstream is the
tests' FakeUpstream, cycling answer → down → answer → hang every --flap-period seconds.

Reports answers by rcode (cached and uncached names apart), failures for names cached beforehand
(SERVFAIL, any other non-answer, or no answer within --client-timeout: the goal is zero), latency
percentiles, and the proxy's RSS over the run. Exits 1 if a cached name failed, the proxy died or logged a
traceback, or the upstream could not be made to flap.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from servers import FakeUpstream, free_port  # noqa: E402  (tests/ is not a package)

HOST = "127.0.0.1"
SOCKETS = 8  # client sockets, so 16-bit IDs never wrap among outstanding queries
FLAP_MODES = ("answer", "down", "answer", "hang")
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def build_query(qname: str, qid: int) -> bytes:
    """A plain RD=1 A query (what a pod's stub resolver sends)."""
    labels = b"".join(bytes((len(label),)) + label.encode() for label in qname.strip(".").split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


def rss_kb(pid: int) -> int:
    """Resident set size in KiB from /proc/PID/status (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


@dataclass
class Tally:
    """What happened to the queries of one kind (names cached beforehand, or unique uncached names)."""

    sent: int = 0
    rcodes: dict[str, int] = field(default_factory=dict)
    empty: int = 0  # NOERROR without an answer record
    timeouts: int = 0
    latencies: list[float] = field(default_factory=list)

    def failures(self) -> int:
        """Queries that did not get a usable answer: any rcode but NOERROR, an empty answer, or none."""
        return sum(n for rcode, n in self.rcodes.items() if rcode != "NOERROR") + self.empty + self.timeouts

    def summary(self) -> dict[str, object]:
        ordered = sorted(self.latencies)
        return {
            "sent": self.sent,
            "answers_by_rcode": dict(sorted(self.rcodes.items())),
            "empty_noerror": self.empty,
            "timeouts": self.timeouts,
            "latency_ms": {
                "p50": round(percentile(ordered, 0.50) * 1000, 2),
                "p99": round(percentile(ordered, 0.99) * 1000, 2),
                "max": round((ordered[-1] if ordered else 0.0) * 1000, 2),
            },
        }


class Flapper:
    """Cycles the upstream through FLAP_MODES every `period` seconds until stopped, ending in "answer"."""

    def __init__(self, upstream: FakeUpstream, period: float) -> None:
        self.upstream = upstream
        self.period = period
        self.switches: list[tuple[float, str]] = []
        self.failed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flapper", daemon=True)

    def __enter__(self) -> Flapper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        set_mode(self.upstream, "answer")

    def _run(self) -> None:
        index = 0
        started = time.monotonic()
        while not self._stop.is_set():
            mode = FLAP_MODES[index % len(FLAP_MODES)]
            if not set_mode(self.upstream, mode):
                self.failed = f"could not switch the upstream to {mode!r}: its port stayed taken"
                return
            self.switches.append((round(time.monotonic() - started, 1), mode))
            index += 1
            self._stop.wait(self.period)


def set_mode(upstream: FakeUpstream, mode: str, tries: int = 50) -> bool:
    """Switch the upstream's mode; leaving "down" rebinds its port, which a short-lived socket of another
    process (an ephemeral port) may hold for a moment, so retry for up to `tries` * 0.1 s."""
    for attempt in range(tries):
        try:
            upstream.mode = mode
            return True
        except OSError as exc:
            print(f"soak: switching the upstream to {mode!r} failed ({exc}), try {attempt + 1}", file=sys.stderr)
            upstream.mode = "down"  # back to a consistent state, so the next try rebinds
            time.sleep(0.1)
    return False


def start_proxy(upstream: FakeUpstream, extra: list[str], logdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """proxy.py on a free loopback port, forwarding to the upstream; returns once it accepts TCP."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE_DNS_PROXY_")}
    env["PYTHONUNBUFFERED"] = "1"
    with (logdir / "proxy.stdout").open("wb") as out, (logdir / "proxy.stderr").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "proxy.py", "--listen", f"{HOST}:{port}", "--upstream", upstream.address, *extra],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"proxy exited with {proc.returncode}: {(logdir / 'proxy.stderr').read_text()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("proxy did not start listening within 10 s")


def stop_proxy(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM the proxy we started (by PID), SIGKILL it if it does not exit in 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def warm(port: int, names: list[str], timeout: float) -> list[str]:
    """Ask every name once while the upstream answers; return the names that did not get an answer."""
    failed = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        for index, name in enumerate(names):
            sock.sendto(build_query(name, index), (HOST, port))
            try:
                while True:
                    reply = sock.recv(65535)
                    if reply[:2] == struct.pack("!H", index):
                        break
            except TimeoutError:
                failed.append(name)
                continue
            if reply[3] & 0xF != 0 or struct.unpack_from("!H", reply, 6)[0] == 0:
                failed.append(name)
    return failed


class LoadGenerator:
    """Sends queries at a fixed rate from SOCKETS sockets and matches answers to queries by (socket, ID)."""

    def __init__(self, port: int, cached: list[str], uncached_ratio: float, client_timeout: float) -> None:
        self.port = port
        self.cached_names = cached
        self.uncached_ratio = uncached_ratio
        self.client_timeout = client_timeout
        self.cached = Tally()
        self.uncached = Tally()
        self.sockets = []
        self.selector = selectors.DefaultSelector()
        for index in range(SOCKETS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((HOST, 0))
            sock.setblocking(False)
            self.sockets.append(sock)
            self.selector.register(sock, selectors.EVENT_READ, index)
        self.outstanding: dict[tuple[int, int], tuple[float, bool]] = {}
        self.count = 0

    def close(self) -> None:
        self.selector.close()
        for sock in self.sockets:
            sock.close()

    def send_one(self) -> None:
        n = self.count
        self.count += 1
        # Every 1/uncached_ratio-th query is a name never asked before; the rest cycle the cached names.
        every = max(1, round(1 / self.uncached_ratio)) if self.uncached_ratio > 0 else 0
        is_cached = not (every and n % every == every - 1)
        name = self.cached_names[n % len(self.cached_names)] if is_cached else f"u{n}-{os.getpid()}.soak.test"
        sock_index = n % SOCKETS
        qid = (n // SOCKETS) & 0xFFFF
        try:
            self.sockets[sock_index].sendto(build_query(name, qid), (HOST, self.port))
        except BlockingIOError:
            pass  # counted as a timeout below: the client could not even send
        (self.cached if is_cached else self.uncached).sent += 1
        self.outstanding[(sock_index, qid)] = (time.monotonic(), is_cached)

    def receive(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout=max(0.0, timeout)):
            sock = self.sockets[key.data]
            while True:
                try:
                    reply = sock.recv(65535)
                except BlockingIOError:
                    break
                if len(reply) < 12:
                    continue
                pending = self.outstanding.pop((key.data, struct.unpack_from("!H", reply)[0]), None)
                if pending is None:
                    continue  # a late answer to a query already counted as a timeout
                sent_at, is_cached = pending
                tally = self.cached if is_cached else self.uncached
                rcode = RCODE_NAMES.get(reply[3] & 0xF, str(reply[3] & 0xF))
                tally.rcodes[rcode] = tally.rcodes.get(rcode, 0) + 1
                if rcode == "NOERROR" and is_cached and struct.unpack_from("!H", reply, 6)[0] == 0:
                    tally.empty += 1
                tally.latencies.append(time.monotonic() - sent_at)

    def expire(self, now: float) -> None:
        for key, (sent_at, is_cached) in list(self.outstanding.items()):
            if now - sent_at > self.client_timeout:
                del self.outstanding[key]
                (self.cached if is_cached else self.uncached).timeouts += 1

    def run(self, rate: float, duration: float, on_second) -> None:
        """Send at `rate` for `duration` seconds (bounded: rate * duration queries), then wait for the stragglers."""
        total = int(rate * duration)
        started = time.monotonic()
        next_second = started + 1
        while self.count < total:
            now = time.monotonic()
            due = min(total, int((now - started) * rate) + 1)
            while self.count < due:
                self.send_one()
            self.receive(started + self.count / rate - time.monotonic())
            if now >= next_second:
                self.expire(now)
                on_second()
                next_second += 1
        end = time.monotonic() + self.client_timeout
        while self.outstanding and time.monotonic() < end:
            self.receive(0.05)
        self.expire(time.monotonic() + self.client_timeout + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    parser.add_argument("--rate", type=float, default=500.0, help="queries per second (default 500)")
    parser.add_argument("--short", action="store_true", help="the CI form: 20 s, flapping every 2 s")
    parser.add_argument("--names", type=int, default=200, help="names cached before the load (default 200)")
    parser.add_argument("--uncached-ratio", type=float, default=0.2, help="share of never-asked names (0.2)")
    parser.add_argument("--flap-period", type=float, default=5.0, help="seconds per upstream mode (default 5)")
    parser.add_argument("--ttl", type=int, default=2, help="TTL of the upstream's answers (default 2)")
    parser.add_argument("--client-timeout", type=float, default=5.0, help="a pod resolver's timeout (5)")
    parser.add_argument("--proxy-arg", action="append", default=[], help="extra flag for proxy.py (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    if args.short:
        args.duration, args.flap_period = 20.0, 2.0
    names = [f"svc{i}.ns{i % 10}.svc.cluster.local" for i in range(args.names)]
    logdir = Path(tempfile.mkdtemp(prefix="soak-"))
    with FakeUpstream(ttl=args.ttl) as upstream:
        proc, port = start_proxy(upstream, args.proxy_arg, logdir)
        try:
            not_warmed = warm(port, names, args.client_timeout)
            if not_warmed:
                print(f"soak: {len(not_warmed)} names did not warm, e.g. {not_warmed[0]}", file=sys.stderr)
                return 1
            rss_start = rss_kb(proc.pid)
            rss_samples = [rss_start]
            load = LoadGenerator(port, names, args.uncached_ratio, args.client_timeout)
            started = time.monotonic()
            try:
                with Flapper(upstream, args.flap_period) as flapper:
                    load.run(args.rate, args.duration, lambda: rss_samples.append(rss_kb(proc.pid)))
            finally:
                load.close()
            elapsed = time.monotonic() - started
            rss_end = rss_kb(proc.pid)
            alive = proc.poll() is None
        finally:
            exit_code = stop_proxy(proc)
    stderr = (logdir / "proxy.stderr").read_text(errors="replace")
    stdout = (logdir / "proxy.stdout").read_text(errors="replace")
    cached_failures = load.cached.failures()
    summary = {
        "duration_s": round(elapsed, 1),
        "rate_qps": args.rate,
        "flaps": flapper.switches,
        "cached_names": len(names),
        "cached": load.cached.summary(),
        "uncached": load.uncached.summary(),
        "cached_failures": cached_failures,
        "proxy_rss_kib": {
            "start": rss_start,
            "end": rss_end,
            "max": max(rss_samples + [rss_end]),
            # Every tenth of the run: flat once the cache is at capacity, or growing (a leak).
            "by_tenth": [rss_samples[min(len(rss_samples) - 1, len(rss_samples) * i // 10)] for i in range(11)],
        },
        "flapper_failed": flapper.failed,
        "proxy_alive_at_end": alive,
        "proxy_exit_code": exit_code,
        "tracebacks_logged": (stdout + stderr).count("Traceback"),
        "logs": str(logdir),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print_report(summary)
    if flapper.failed:
        print(f"soak: {flapper.failed}; the run did not flap as asked", file=sys.stderr)
    ok = cached_failures == 0 and alive and summary["tracebacks_logged"] == 0 and not flapper.failed
    return 0 if ok else 1


def print_report(summary: dict) -> None:
    cached, uncached = summary["cached"], summary["uncached"]
    print(
        f"soak: {summary['duration_s']} s at {summary['rate_qps']:.0f} q/s; upstream cycled {' -> '.join(FLAP_MODES)}, "
        f"{len(summary['flaps'])} switches, every {summary['flaps'][1][0] if len(summary['flaps']) > 1 else '-'} s"
    )
    for label, tally in (("cached names", cached), ("uncached names", uncached)):
        latency = tally["latency_ms"]
        print(
            f"  {label}: sent {tally['sent']}, answers {tally['answers_by_rcode']}, empty {tally['empty_noerror']}, "
            f"timeouts {tally['timeouts']}; latency p50 {latency['p50']} ms, p99 {latency['p99']} ms, "
            f"max {latency['max']} ms"
        )
    rss = summary["proxy_rss_kib"]
    print(f"  failures for cached names: {summary['cached_failures']} (goal 0)")
    print(f"  proxy RSS: start {rss['start']} KiB, end {rss['end']} KiB, max {rss['max']} KiB")
    print(f"  proxy RSS every tenth of the run (KiB): {rss['by_tenth']}")
    print(
        f"  proxy alive at end: {summary['proxy_alive_at_end']}, exit code {summary['proxy_exit_code']}, "
        f"tracebacks logged: {summary['tracebacks_logged']}; logs in {summary['logs']}"
    )


if __name__ == "__main__":
    sys.exit(main())
