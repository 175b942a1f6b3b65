"""Recovery within a second, measured in network namespaces: kube-dns silent for 20 s, then back with new data.

Topology, only 169.254.0.0/16 addresses, in two namespaces each test creates and deletes:

  [node] proxy.py on 127.0.0.1:53, clients   r0 169.254.102.1 --veth-- r1 169.254.102.2   [up] kube-dns stand-in

The outage is silent, as when a node loses its path to kube-dns: iptables in the up namespace
drops every DNS packet, so the proxy sees timeouts, never a refusal. While it lasts, the stand-in is
replaced by one answering other addresses; the drop rules then go, and the test measures how long
the node keeps answering old data, and how many queries per second the new kube-dns receives.

Run as a script, this file is the stand-in (``serve``: FakeUpstream on a fixed address, printing one
JSON line per query received) and the clients (``ask``: each name once; ``watch``: one name every
20 ms), started inside a namespace with ``ip netns exec``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dnslib
import pytest

import test_netsetup

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
NODE_SIDE = "169.254.102.1"
KUBE_DNS = "169.254.102.2"
OLD_ANSWER = "192.0.2.1"
NEW_ANSWER = "192.0.2.2"
TTL = 2
NAMES = [f"n{index:03}.recovery.test." for index in range(200)]
WATCHED = NAMES[0]
OUTAGE = 20.0
REFRESH_RATE = 20  # --recovery-refresh-rate: small, so that the bound shows in the stand-in's count
RECOVERY_GOAL = 1.0  # the goal; the test allows RECOVERY_LIMIT for a loaded machine
RECOVERY_LIMIT = 2.0


# -- the script side: the stand-in and the clients ----------------------------------------------


def serve(host: str, port: int, answer: str, ttl: int) -> None:
    """Answer every A query with `answer` (TTL `ttl`) on host:port, UDP and TCP; one JSON line per query."""
    sys.path.insert(0, str(THIS.parent))
    import servers

    class Logged(servers.FakeUpstream):
        def _append(self, query: servers.ReceivedQuery) -> None:
            super()._append(query)
            print(json.dumps({"at": time.monotonic(), "qname": query.qname.lower(), "qtype": query.qtype}), flush=True)

    servers.free_port = lambda: port  # the fixed address the proxy forwards to, in a namespace of our own
    stand_in = Logged(ttl=ttl)
    stand_in.host = host
    stand_in.default_address = answer
    stand_in.start()
    print("ready", flush=True)
    time.sleep(600)  # bounded; the test kills it by PID long before


def query_once(server: str, qname: str, timeout: float) -> str:
    """The first A address of one UDP query, or 'error:<reason>'."""
    query = dnslib.DNSRecord.question(qname, "A")
    host, _, port = server.rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host, int(port)))
            sock.send(query.pack())
            reply = dnslib.DNSRecord.parse(sock.recv(4096))
    except OSError as exc:
        return f"error:{type(exc).__name__}"
    if reply.header.id != query.header.id or not reply.rr:
        return f"error:rcode={reply.header.rcode}"
    return str(reply.rr[0].rdata)


def ask(server: str, names: list[str]) -> None:
    """Ask each name once (3 s timeout), one after the other; print the count of each answer."""
    answers = Counter(query_once(server, qname, 3.0) for qname in names)
    print(json.dumps(dict(answers)), flush=True)


def watch(server: str, qname: str, duration: float) -> None:
    """Ask qname every 20 ms for `duration` seconds at most; one JSON line per query."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        sent = time.monotonic()
        answer = query_once(server, qname, 3.0)
        print(json.dumps({"sent": sent, "done": time.monotonic(), "answer": answer}), flush=True)
        time.sleep(max(0.0, sent + 0.02 - time.monotonic()))


# -- the lab ------------------------------------------------------------------------------------


def _run(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll predicate every 50 ms for at most `timeout` seconds; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting until {what}")


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue  # a line still being written
    return lines


class Lab(test_netsetup.Lab):
    """A node namespace (proxy, clients) and an up namespace (the kube-dns stand-in), joined by a veth pair.

    Processes start and the lab is deleted as in test_netsetup's lab (start, close); only the
    namespaces and links differ.
    """

    def __init__(self, workdir: Path) -> None:
        suffix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.node = f"kdp-rnode-{suffix}"
        self.up = f"kdp-rup-{suffix}"
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.created: list[str] = []

    def setup(self) -> None:
        for ns in (self.node, self.up):
            _run(["ip", "netns", "add", ns])
            self.created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # Never the host's resolv.conf: nothing in the lab resolves outside it.
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(f"nameserver {KUBE_DNS}\n")
        for args in (
            ["-n", self.node, "link", "add", "r0", "type", "veth", "peer", "name", "r1", "netns", self.up],
            ["-n", self.node, "addr", "add", f"{NODE_SIDE}/30", "dev", "r0"],
            ["-n", self.up, "addr", "add", f"{KUBE_DNS}/30", "dev", "r1"],
            ["-n", self.node, "link", "set", "r0", "up"],
            ["-n", self.up, "link", "set", "r1", "up"],
        ):
            _run(["ip", *args])

    def stand_in(self, answer: str) -> Any:
        return self.start(
            self.up, "kube-dns", [sys.executable, str(THIS), "serve", KUBE_DNS, "53", answer, str(TTL)], "ready"
        )

    def script(self, *args: str, timeout: float = 60) -> str:
        """Run this file's client in the node namespace and return its output."""
        argv = ["ip", "netns", "exec", self.node, "env", f"PYTHONPATH={ROOT}", sys.executable, str(THIS), *args]
        return _run(argv, timeout=timeout).stdout

    def silence(self, on: bool) -> None:
        """Drop (or stop dropping) every DNS packet reaching the stand-in: a silent outage."""
        for proto in ("udp", "tcp"):
            rule = ["INPUT", "-p", proto, "--dport", "53", "-j", "DROP"]
            _run(["ip", "netns", "exec", self.up, "iptables", "-w", "5", "-I" if on else "-D", *rule])

    def stop(self, proc: Any) -> None:
        """Kill one process we started, by its PID."""
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def recovery_lab(tmp_path: Path) -> Iterator[Lab]:
    """A fresh node/up lab, deleted afterwards even on failure."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        pytest.skip("needs root, ip and iptables (./dev.sh setup)")
    lab = Lab(tmp_path)
    try:
        lab.setup()
        yield lab
    finally:
        lab.close()


@pytest.mark.netns
@pytest.mark.timeout(150)
def test_fresh_data_within_a_second_of_kube_dns_answering_again(recovery_lab: Lab) -> None:
    """After a 20 s silent outage, the node answers kube-dns's new data within a second of it answering again, and
    the names answered stale meanwhile are refreshed at --recovery-refresh-rate, never faster."""
    lab = recovery_lab
    old = lab.stand_in(OLD_ANSWER)
    proxy = lab.start(
        lab.node,
        "proxy",
        [
            sys.executable,
            str(ROOT / "proxy.py"),
            "--listen",
            "127.0.0.1:53",
            "--upstream",
            f"{KUBE_DNS}:53",
            "--recovery-refresh-rate",
            str(REFRESH_RATE),
        ],
        '"serving"',
    )
    names_file = lab.workdir / "names.txt"
    names_file.write_text("\n".join(NAMES))
    assert json.loads(lab.script("ask", "127.0.0.1:53", str(names_file))) == {OLD_ANSWER: len(NAMES)}
    time.sleep(TTL + 0.5)  # every name stale

    watcher = lab.start(lab.node, "watch", [sys.executable, str(THIS), "watch", "127.0.0.1:53", WATCHED, "90"])
    lab.silence(True)
    down_at = time.monotonic()
    wait_for(lambda: "upstream_down" in proxy.log_path.read_text(), 10, "the proxy marks kube-dns down")
    # Every name is asked during the outage: answered stale at once, each remembered for the recovery.
    assert json.loads(lab.script("ask", "127.0.0.1:53", str(names_file))) == {OLD_ANSWER: len(NAMES)}
    lab.stop(old)  # kube-dns comes back with other data
    new = lab.stand_in(NEW_ANSWER)
    time.sleep(max(0.0, down_at + OUTAGE - time.monotonic()))
    back_at = time.monotonic()  # before the rules go: the measure can only be longer
    lab.silence(False)
    time.sleep(len(NAMES) / REFRESH_RATE + 2)  # the whole recovery refresh
    lab.stop(watcher)

    samples = json_lines(watcher.log_path)
    fresh = [s for s in samples if s["answer"] == NEW_ANSWER and s["sent"] >= back_at]
    assert fresh, f"no fresh answer after kube-dns came back: {samples[-5:]}"
    recovery = fresh[0]["done"] - back_at
    stale_after = [s for s in samples if s["sent"] > fresh[0]["done"] and s["answer"] != NEW_ANSWER]
    print(f"\nfresh data {recovery:.3f} s after kube-dns answered again (goal {RECOVERY_GOAL} s)")
    assert recovery <= RECOVERY_LIMIT
    assert stale_after == []

    received = [q for q in json_lines(new.log_path) if q["at"] >= back_at]
    refreshes = [q for q in received if q["qname"] not in (".", WATCHED)]
    per_second = Counter(int(q["at"] - back_at) for q in refreshes)
    all_per_second = Counter(int(q["at"] - back_at) for q in received)
    print(f"kube-dns received per second after it came back (all queries): {sorted(all_per_second.items())}")
    print(f"... of which recovery refreshes (--recovery-refresh-rate {REFRESH_RATE}): {sorted(per_second.items())}")
    refreshed_names = [q["qname"] for q in refreshes]
    assert len(set(refreshed_names)) == len(refreshed_names) >= len(NAMES) - 2  # each name once
    # Counted on arrival: the proxy spaces its sends 1/rate apart (tests/test_recovery_spec.py), and a
    # few milliseconds of delivery jitter may move one refresh across a second's edge.
    assert max(per_second.values()) <= REFRESH_RATE + 1
    assert max(all_per_second.values()) <= REFRESH_RATE + 4  # and the probe and the watched name's own refreshes

    def episode_ended() -> bool:
        return any(line.get("event") == "stale_serving_ended" for line in json_lines(proxy.log_path))

    wait_for(episode_ended, 20, "the proxy logs stale_serving_ended")
    ended = next(line for line in json_lines(proxy.log_path) if line.get("event") == "stale_serving_ended")
    print(f"stale_serving_ended: { {k: v for k, v in ended.items() if k not in ('timestamp', 'level')} }")
    assert ended["names_served_stale"] == len(NAMES)
    assert ended["refreshed"] >= len(NAMES) - 2 and ended["refresh_failed"] == 0
    assert ended["recovery_seconds"] <= RECOVERY_LIMIT


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "serve":
        serve(args[0], int(args[1]), args[2], int(args[3]))
    elif command == "ask":
        ask(args[0], Path(args[1]).read_text().split())
    elif command == "watch":
        watch(args[0], args[1], float(args[2]))
    else:
        sys.exit(f"unknown command {command!r}")
