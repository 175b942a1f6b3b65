"""Crash fallback: remove the proxy's interception when the proxy is dead or stalled too long.

Runs as a second container of the proxy's pod (same host network namespace).  A SIGKILL or
OOM kill of the proxy skips its teardown, so its rules keep diverting every pod's DNS to a dead
socket.  This loop sends a real DNS query to the proxy every ``--interval`` seconds and, when it
goes unanswered, tells a dead proxy from a stalled one:

* **dead**: the probe is refused (ICMP port unreachable: nothing is bound there any more) or no
  instance is alive in the registry (``handover.InstanceRegistry``: every proxy holds a flock for
  its whole life, and the kernel releases it when the process dies, ``kill -9`` included).  The
  interception goes after ``--failures`` failed probes in a row; a refusal is confirmed after
  CONFIRM_DELAY rather than a full interval, since the kernel does not refuse a live socket.
* **stalled**: the probe times out while an instance is alive (SIGSTOP, a long GC pause, a full
  socket queue).  Its queries wait in the socket queue and are answered once it runs again, so the
  interception stays for ``--stall-window`` seconds of silence before it goes.

The teardown (``netsetup.Interceptor.teardown``: every rule, address and interface with the tag)
happens under the registry's node-wide lock, the one the proxy installs and tears down under, so
it never interleaves with a restarted proxy's install; under the lock the watchdog probes once
more and leaves alone a proxy that answers again.  Without the proxy's diverting rules there is
nothing to protect the pods from: a proxy that stopped gracefully (its own teardown or handover
ran) or one draining after removing its rules makes the watchdog disarm quietly, not tear down.
Disarmed, it waits without probing until rules are installed again, then re-arms.

Probe: a stdlib UDP socket and the proxy's self-check query (``wire.self_query``); any reply
with our ID and QR=1 counts as alive, whatever its rcode, like CoreDNS forward's health check.
The default qname is under ``invalid.``, which RFC 6761 §6.4 lets a resolver answer with NXDOMAIN
without asking anyone.  Plain threads, no gevent monkey-patching: the registry's lock wait
(``gevent.sleep``) then simply sleeps this thread.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
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
from config import Config
from handover import InstanceRegistry
from logs import configure_logging

DEFAULT_QNAME = "kube-dns-proxy-probe.invalid."
DEFAULT_STATE_DIR = Config.state_dir  # the proxy's default: both must name one registry
ENV_PREFIX = "KUBE_DNS_PROXY_WATCHDOG_"
CONFIRM_DELAY = 0.1  # seconds before a refused probe is sent again
# How long to wait for the node's lock before tearing down without it.  Its holders (install,
# sync, teardown) take well under a second; one holding it longer is stopped with the lock, and a
# proxy installing slowly already serves, so the probe under the lock would find it answering.
LOCK_TIMEOUT = 5.0

DEAD = "dead"
STALLED = "stalled"


class Outcome(enum.Enum):
    """What one probe found."""

    ANSWERED = "answered"
    REFUSED = "refused"  # the kernel said no at once: port unreachable, or no route to the address
    TIMEOUT = "timeout"  # sent, not answered in time: a socket is bound but nobody reads it


class Teardown(Protocol):
    """What the watchdog needs from netsetup.Interceptor."""

    def has_tagged_rules(self) -> bool: ...

    def teardown(self) -> None: ...


class Registry(Protocol):
    """What the watchdog needs from handover.InstanceRegistry (it never registers itself)."""

    def any_alive(self) -> bool: ...

    def locked(self) -> contextlib.AbstractContextManager[None]: ...


Prober = Callable[[tuple[str, int], str, float], Outcome]


def probe(address: tuple[str, int], qname: str, timeout: float) -> Outcome:
    """Send one query over UDP; tell whether a reply with our ID came back within ``timeout``, and if not, why."""
    qid = secrets.randbelow(0x10000)
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            # connect() so an ICMP port unreachable (nothing bound) fails at once: ECONNREFUSED.
            sock.connect(address)
            sock.send(wire.self_query(qid, qname))
            while (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                if wire.is_reply_to(sock.recv(4096), qid):
                    return Outcome.ANSWERED
    except TimeoutError:
        return Outcome.TIMEOUT
    except OSError:  # ECONNREFUSED, ENETUNREACH (our address is gone): nothing can answer there
        return Outcome.REFUSED
    return Outcome.TIMEOUT


class Watchdog:
    """Probes the proxy; tears its interception down when it is dead, or stalled for too long."""

    def __init__(
        self,
        interceptor: Teardown,
        registry: Registry,
        address: tuple[str, int],
        log: Any,
        *,
        qname: str = DEFAULT_QNAME,
        failures: int = 2,
        timeout: float = 0.3,
        stall_window: float = 3.0,
        prober: Prober = probe,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Keep what to probe, what to tear down and where the proxies register; start disarmed."""
        self._interceptor = interceptor
        self._registry = registry
        self._address = address
        self._log = log
        self._qname = qname
        self._threshold = failures
        self._timeout = timeout
        self._stall_window = stall_window
        self._prober = prober
        self._clock = clock
        self.armed = False
        self.failures = 0
        self.silent_since: float | None = None  # when the first unanswered probe of this run was sent
        self.confirm_soon = False  # the last probe was refused: the next one comes after CONFIRM_DELAY
        self.teardowns = 0

    def step(self) -> None:
        """Run one round: re-arm when rules are back, or probe and decide."""
        self.confirm_soon = False
        if not self.armed:
            self._arm_when_rules_back()
            return
        sent = self._clock()
        outcome = self._prober(self._address, self._qname, self._timeout)
        if outcome is Outcome.ANSWERED:
            if self.failures:
                self._log.info("proxy_answering_again", failures=self.failures, silent_seconds=self._silent(sent))
            self._reset()
            return
        if self.silent_since is None:
            self.silent_since = sent
        self.failures += 1
        cause = self._cause(outcome)
        due = self.failures >= self._threshold and (cause == DEAD or self._silent() >= self._stall_window)
        if not due and not self._rules_installed():
            self._disarm_quietly()
            return
        self._log.warning(
            "probe_failed",
            probe=outcome.value,
            cause=cause,
            failures=self.failures,
            threshold=self._threshold,
            silent_seconds=self._silent(),
            next="teardown" if due else "probe",
        )
        if due:
            self._tear_down_under_lock()
        else:
            self.confirm_soon = outcome is Outcome.REFUSED

    def _arm_when_rules_back(self) -> None:
        try:
            rules_back = self._interceptor.has_tagged_rules()
        except netsetup.InterceptError as exc:
            self._log.warning("watchdog_check_failed", error=str(exc))
            return
        if rules_back:
            self.armed = True
            self._reset()
            self._log.info(
                "watchdog_armed",
                probe=f"{self._address[0]}:{self._address[1]}",
                instance_alive=self._registry.any_alive(),
            )

    def _tear_down_under_lock(self) -> None:
        # Under the node's lock no proxy is halfway through claim, install or teardown: the rules
        # we see are a whole set or none, and a restarted proxy that installed them serves.
        with self._registry.locked():
            if not self._rules_installed():
                self._disarm_quietly()
                return
            outcome = self._prober(self._address, self._qname, self._timeout)
            if outcome is Outcome.ANSWERED:
                self._log.info("teardown_cancelled", reason="proxy_answered", failures=self.failures)
                self._reset()
                return
            cause = self._cause(outcome)
            if cause == STALLED and self._silent() < self._stall_window:
                # Dead a moment ago, now a live instance is silent: a proxy restarted meanwhile.
                self._log.info("teardown_postponed", reason="instance_alive", probe=outcome.value)
                self.silent_since = self._clock()
                return
            started = self._clock()
            self._interceptor.teardown()
            teardown_ms = round((self._clock() - started) * 1000, 1)
        self.teardowns += 1
        self._log.error(
            "proxy_unresponsive_interception_removed",
            cause=cause,
            probe=outcome.value,
            failures=self.failures,
            silent_seconds=self._silent(started),
            teardown_ms=teardown_ms,
        )
        self.armed = False
        self._reset()

    def _cause(self, outcome: Outcome) -> str:
        if outcome is Outcome.REFUSED or not self._registry.any_alive():
            return DEAD
        return STALLED

    def _rules_installed(self) -> bool:
        try:
            return self._interceptor.has_tagged_rules()
        except netsetup.InterceptError as exc:
            # Cannot tell: decide as if they were there (teardown removes only what is tagged).
            self._log.warning("watchdog_check_failed", error=str(exc))
            return True

    def _disarm_quietly(self) -> None:
        # No diverting rule: the proxy's own teardown or handover ran (a graceful exit, or a drain
        # whose addresses must stay until it ends), or someone removed them.  Nothing to undo.
        self._log.info(
            "watchdog_disarmed",
            reason="no_rules",
            instance_alive=self._registry.any_alive(),
            failures=self.failures,
        )
        self.armed = False
        self._reset()

    def _silent(self, now: float | None = None) -> float:
        if self.silent_since is None:
            return 0.0
        return round((self._clock() if now is None else now) - self.silent_since, 3)

    def _reset(self) -> None:
        self.failures = 0
        self.silent_since = None

    def run(self, interval: float, stop: threading.Event) -> None:
        """Call step() every ``interval`` seconds (a refusal is confirmed sooner) until ``stop`` is set."""
        next_round = time.monotonic()
        while not stop.is_set():
            self.step()
            next_round += min(CONFIRM_DELAY, interval) if self.confirm_soon else interval
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
        help="address of the proxy to query, HOST:PORT or [V6]:PORT (e.g. 169.254.20.10:53, [fd00::10]:53)",
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
        help="failed probes in a row before the teardown of a dead proxy's interception (2)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=default("timeout", "0.3"),
        help="seconds to wait for each reply (0.3)",
    )
    parser.add_argument(
        "--stall-window",
        type=_positive,
        default=default("stall_window", "3"),
        help="seconds a live but silent (stalled) proxy keeps its interception (3)",
    )
    parser.add_argument(
        "--state-dir",
        default=default("state_dir", DEFAULT_STATE_DIR),
        help=f"the proxy's --state-dir: its instance registry and node-wide lock ({DEFAULT_STATE_DIR})",
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
    if not os.path.isdir(args.state_dir):
        # Every silent proxy then looks dead: a stall gets no --stall-window.
        log.warning("state_dir_missing", state_dir=args.state_dir)
    watchdog = Watchdog(
        netsetup.Interceptor(spec, log),
        InstanceRegistry(args.state_dir, log, lock_timeout=LOCK_TIMEOUT),
        args.probe,
        log,
        qname=args.qname,
        failures=args.failures,
        timeout=args.timeout,
        stall_window=args.stall_window,
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
        probe=f"[{args.probe[0]}]:{args.probe[1]}" if ":" in args.probe[0] else f"{args.probe[0]}:{args.probe[1]}",
        interval=args.interval,
        failures=args.failures,
        timeout=args.timeout,
        stall_window=args.stall_window,
        state_dir=args.state_dir,
        tag=args.tag,
    )
    watchdog.run(args.interval, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
