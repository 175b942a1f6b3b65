"""Shared fixtures: Knot, the fake upstream, proxy processes, and dig/dnspython query helpers.

It also gives every test exactly one of the markers unit, e2e or netns (see pyproject.toml and
pytest_collection_modifyitems below).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from servers import FakeUpstream, KnotServer, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
PROXY_START_TIMEOUT = 10.0
PROXY_STOP_TIMEOUT = 10.0

# The three kinds of test, from quickest to heaviest; each test carries exactly one of them.
TEST_KINDS = ("unit", "e2e", "netns")
# Fixtures that start a server or process (fixture names are unique across tests/). A test using
# one of them, directly or through another fixture, is at least that kind.
KIND_OF_FIXTURE = {
    # conftest.py
    "knot": "e2e",
    "fake_upstream": "e2e",
    "proxy_factory": "e2e",
    # test_fuzz.py
    "scripted_proxy": "e2e",
    # test_netsetup.py
    "answering": "e2e",
    "closed_port": "e2e",
    "lab": "netns",
    # test_ipv6.py
    "upstream6": "e2e",
    "lab6": "netns",
    "dual_lab": "netns",
    # test_upgrade.py
    "loopback": "e2e",
    "intercepted": "netns",
}


class Clock:
    """A monotonic clock the test moves by hand, for the code under test that takes a `timer`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def split_address(address: str) -> tuple[str, int]:
    """Split "127.0.0.1:53" or "[::1]:53" into host and port; refuse anything off loopback."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    # Hard rule of this project: tests send DNS traffic to loopback only.
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"tests may only query loopback addresses, not {address}")
    return host, int(port)


def query(
    address: str,
    qname: str,
    qtype: str = "A",
    tcp: bool = False,
    edns: int | None = None,
    timeout: float = 3.0,
    *,
    want_dnssec: bool = False,
) -> dns.message.Message:
    """Send one query with dnspython and return the reply.

    address: "HOST:PORT" on loopback. edns: the EDNS UDP payload size to advertise, or None for
    a plain RFC 1035 query without OPT (what glibc and musl stubs send). want_dnssec sets the
    DO bit (implies EDNS). Raises dns.exception.Timeout when no reply arrives in timeout seconds.
    """
    host, port = split_address(address)
    message = dns.message.make_query(
        qname,
        qtype,
        use_edns=0 if (edns is not None or want_dnssec) else False,
        payload=edns if edns is not None else 1232,
        want_dnssec=want_dnssec,
    )
    if tcp:
        return dns.query.tcp(message, host, port=port, timeout=timeout)
    return dns.query.udp(message, host, port=port, timeout=timeout)


def dig(*args: str) -> str:
    """Run the real dig with one 3-second try and return its stdout.

    args must name the server ("@127.0.0.1") and usually the port ("-p", "5353"): without a
    server, dig would ask the resolv.conf nameserver, which tests must never reach.
    """
    servers = [arg for arg in args if arg.startswith("@")]
    if not servers:
        raise ValueError("dig() needs an @SERVER argument (loopback only)")
    for server in servers:
        split_address(server[1:] + ":53")
    result = subprocess.run(
        ["dig", "+time=3", "+tries=1", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    return result.stdout


class ProxyProcess:
    """One proxy.py subprocess, listening on 127.0.0.1:port, with its output in files."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        port: int,
        stdout_path: Path,
        stderr_path: Path,
    ) -> None:
        self.proc = proc
        self.port = port
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path

    @property
    def address(self) -> str:
        """Return "127.0.0.1:PORT"."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """Return the PID of the proxy process."""
        return self.proc.pid

    def stdout(self) -> str:
        """Return everything the proxy wrote to stdout so far."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """Return everything the proxy wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        """Return the JSON lines of stdout as dicts, skipping lines that are not JSON objects."""
        entries: list[dict[str, Any]] = []
        for line in self.stdout().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def stop(self, sig: int = signal.SIGTERM, timeout: float = PROXY_STOP_TIMEOUT) -> int:
        """Send sig to the proxy's PID, SIGKILL it after timeout seconds; return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=PROXY_STOP_TIMEOUT)
        return self.proc.returncode


def _names_upstream(args: tuple[str, ...], env: dict[str, str]) -> bool:
    """Return True if args or env give the proxy its upstreams explicitly."""
    flags = ("--upstream", "--resolv-conf")
    variables = ("KUBE_DNS_PROXY_UPSTREAM", "KUBE_DNS_PROXY_RESOLV_CONF")
    return any(arg.split("=")[0] in flags for arg in args) or any(v in env for v in variables)


def _wait_listening(proxy: ProxyProcess) -> None:
    """Return once a TCP connect to the proxy succeeds; fail the test if it exits or times out."""
    deadline = time.monotonic() + PROXY_START_TIMEOUT
    while time.monotonic() < deadline:
        if proxy.proc.poll() is not None:
            pytest.fail(
                f"proxy exited with {proxy.proc.returncode} before listening\n"
                f"--- stderr ---\n{proxy.stderr()}\n--- stdout ---\n{proxy.stdout()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    proxy.stop()
    pytest.fail(
        f"proxy did not accept TCP on {proxy.address} within {PROXY_START_TIMEOUT} s\n"
        f"--- stderr ---\n{proxy.stderr()}\n--- stdout ---\n{proxy.stdout()}"
    )


@pytest.fixture(scope="session")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnotServer]:
    """A Knot DNS server for the session, serving servers.ZONE_RECORDS on 127.0.0.1."""
    with KnotServer(tmp_path_factory.mktemp("knot")) as server:
        yield server


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    """A FakeUpstream in "answer" mode for one test."""
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """A function start(*args, env=None) that runs proxy.py on a free port and waits for it."""
    started: list[ProxyProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ProxyProcess:
        extra_env = dict(env or {})
        if not _names_upstream(args, extra_env):
            # Without an explicit upstream the proxy would read /etc/resolv.conf and forward
            # to a nameserver off this machine, which tests must never reach.
            raise ValueError("give the proxy --upstream or --resolv-conf (loopback only)")
        # Flags from the developer's shell must not leak into a test's proxy.
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE_DNS_PROXY_")}
        # Unbuffered stdout: logs() must see lines while the proxy still runs.
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(extra_env)
        port = free_port()
        index = len(started)
        stdout_path = tmp_path / f"proxy-{index}.stdout"
        stderr_path = tmp_path / f"proxy-{index}.stderr"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "proxy.py", "--listen", f"127.0.0.1:{port}", *args],
                cwd=REPO_ROOT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        proxy = ProxyProcess(proc, port, stdout_path, stderr_path)
        started.append(proxy)
        _wait_listening(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each test exactly one of unit, e2e, netns, before ``-m`` selects among them.

    An explicit mark on the test, its class or its module wins: tests that start a process or a
    socket without a fixture above carry ``@pytest.mark.e2e`` (or netns). Otherwise the heaviest
    kind of the fixtures it uses decides, and a test using none of them is unit. Contradictions (two
    kinds marked, or a mark lighter than a fixture's kind) stop the run with a usage error.
    """
    problems = []
    for item in items:
        marked = {mark.name for mark in item.iter_markers() if mark.name in TEST_KINDS}
        implied = [KIND_OF_FIXTURE[name] for name in getattr(item, "fixturenames", ()) if name in KIND_OF_FIXTURE]
        needed = max(implied, key=TEST_KINDS.index, default="unit")
        if not marked:
            item.add_marker(needed)
        elif any(TEST_KINDS.index(kind) < TEST_KINDS.index(needed) for kind in marked):
            problems.append(f"{item.nodeid}: marked {'+'.join(sorted(marked))}, uses a fixture that makes it {needed}")
        kinds = {mark.name for mark in item.iter_markers() if mark.name in TEST_KINDS}
        if len(kinds) != 1:
            problems.append(f"{item.nodeid}: marked {', '.join(sorted(kinds))}; it needs exactly one of {TEST_KINDS}")
    if problems:
        raise pytest.UsageError("unit/e2e/netns markers:\n  " + "\n  ".join(problems))
