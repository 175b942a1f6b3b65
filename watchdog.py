"""Crash fallback: remove the proxy's interception when the proxy stops answering DNS.

Runs as a second container of the proxy's pod (same host network namespace).  A SIGKILL or
OOM kill of the proxy skips its teardown, so its rules keep diverting every pod's DNS to a dead
socket.  This loop sends a real DNS query to the proxy every ``--interval`` seconds; after
``--failures`` unanswered probes in a row it removes every rule, address and interface carrying
the proxy's tag (``netsetup.Interceptor.teardown``), and kube-proxy's path to kube-dns answers
again.  It then waits, without probing, until the proxy has installed its rules again (the
restarted proxy removes leftovers, binds, adds addresses, installs rules) and re-arms.

Probe: a stdlib UDP socket and the proxy's self-check query (``wire.self_query``); any reply
with our ID and QR=1 counts as alive, whatever its rcode, like CoreDNS forward's health check.
The default qname is under ``invalid.``, which RFC 6761 §6.4 lets a resolver answer with NXDOMAIN without asking anyone.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import netsetup
import wire
from logs import configure_logging

DEFAULT_QNAME = "kube-dns-proxy-probe.invalid."
ENV_PREFIX = "KUBE_DNS_PROXY_WATCHDOG_"


class Teardown(Protocol):
    """What the watchdog needs from netsetup.Interceptor."""

    def has_tagged_rules(self) -> bool: ...

    def teardown(self) -> None: ...


def probe(address: tuple[str, int], qname: str, timeout: float) -> bool:
    """Send one query over UDP; tell whether a reply with our ID came back within ``timeout``."""
    qid = secrets.randbelow(0x10000)
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            # connect() so an ICMP port unreachable (proxy gone) fails at once: ECONNREFUSED.
            sock.connect(address)
            sock.send(wire.self_query(qid, qname))
            while (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                if wire.is_reply_to(sock.recv(4096), qid):
                    return True
    except OSError:  # timeout, refused, unreachable: all mean "not answering"
        return False
    return False


class Watchdog:
    """Probes the proxy and tears its interception down after N failed probes in a row."""

    def __init__(
        self,
        interceptor: Teardown,
        address: tuple[str, int],
        log: Any,
        *,
        qname: str = DEFAULT_QNAME,
        failures: int = 2,
        timeout: float = 0.3,
        prober: Callable[[tuple[str, int], str, float], bool] = probe,
    ) -> None:
        """Keep what to probe and what to tear down; start disarmed."""
        self._interceptor = interceptor
        self._address = address
        self._log = log
        self._qname = qname
        self._threshold = failures
        self._timeout = timeout
        self._prober = prober
        self.armed = False
        self.failures = 0
        self.teardowns = 0

    def step(self) -> None:
        """Run one round: re-arm when rules are back, or probe and maybe tear down."""
        if not self.armed:
            try:
                rules_back = self._interceptor.has_tagged_rules()
            except netsetup.InterceptError as exc:
                self._log.warning("watchdog_check_failed", error=str(exc))
                return
            if rules_back:
                self.armed = True
                self.failures = 0
                self._log.info("watchdog_armed", probe=f"{self._address[0]}:{self._address[1]}")
            return
        if self._prober(self._address, self._qname, self._timeout):
            self.failures = 0
            return
        self.failures += 1
        self._log.warning("probe_failed", failures=self.failures, threshold=self._threshold)
        if self.failures < self._threshold:
            return
        started = time.monotonic()
        self._interceptor.teardown()
        self.armed = False
        self.teardowns += 1
        self._log.error(
            "proxy_unresponsive_interception_removed",
            failures=self.failures,
            teardown_ms=round((time.monotonic() - started) * 1000, 1),
        )

    def run(self, interval: float, stop: threading.Event) -> None:
        """Call step() every ``interval`` seconds until ``stop`` is set."""
        next_round = time.monotonic()
        while not stop.is_set():
            self.step()
            next_round += interval
            # After a slow round, start the next one now rather than catching up in a burst.
            next_round = max(next_round, time.monotonic())
            stop.wait(next_round - time.monotonic())


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; every flag defaults to its KUBE_DNS_PROXY_WATCHDOG_<FLAG> env var."""
    env = os.environ

    def default(flag: str, value: str | None) -> str | None:
        return env.get(ENV_PREFIX + flag.upper().replace("-", "_"), value)

    parser = argparse.ArgumentParser(prog="watchdog", description=__doc__.splitlines()[0])
    probe_default = default("probe", None)
    parser.add_argument(
        "--probe",
        type=_host_port,
        required=probe_default is None,
        default=probe_default,
        help="address of the proxy to query, HOST:PORT (e.g. 169.254.20.10:53)",
    )
    parser.add_argument(
        "--interval",
        type=_positive,
        default=default("interval", "0.5"),
        help="seconds between probes (0.5)",
    )
    parser.add_argument(
        "--failures",
        type=int,
        default=default("failures", "2"),
        help="failed probes in a row before the teardown (2)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=default("timeout", "0.3"),
        help="seconds to wait for each reply (0.3)",
    )
    parser.add_argument("--qname", default=default("qname", DEFAULT_QNAME), help=f"name to query ({DEFAULT_QNAME})")
    parser.add_argument(
        "--tag",
        default=default("tag", "kube-dns-proxy"),
        help="tag of the proxy's rules and addresses (kube-dns-proxy)",
    )
    parser.add_argument(
        "--log-level",
        default=default("log_level", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    args = parser.parse_args(argv)
    if args.failures < 1:
        parser.error("--failures must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the watchdog until SIGTERM or SIGINT."""
    args = parse_args(argv)
    log = configure_logging(args.log_level).bind(component="watchdog")
    try:
        spec = netsetup.InterceptSpec(mode="none", local_ips=(), tag=args.tag)
        wire.name_to_wire(args.qname)
    except (netsetup.InterceptError, ValueError) as exc:
        log.error("invalid_configuration", error=str(exc))
        return 2
    watchdog = Watchdog(
        netsetup.Interceptor(spec, log),
        args.probe,
        log,
        qname=args.qname,
        failures=args.failures,
        timeout=args.timeout,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        # PID 1 in its container ignores SIGTERM without a handler.  No teardown here: on pod
        # deletion the proxy tears down itself, and a dying watchdog must not remove live rules.
        log.info("watchdog_stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "watchdog_started",
        probe=f"{args.probe[0]}:{args.probe[1]}",
        interval=args.interval,
        failures=args.failures,
        timeout=args.timeout,
        tag=args.tag,
    )
    watchdog.run(args.interval, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
