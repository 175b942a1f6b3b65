"""Takeover between proxy instances on one node: the instance registry and the drain of a socket.

An upgrade runs the new proxy next to the old one (a DaemonSet surge pod) until the old one exits.
Both hold the listening sockets at once (``SO_REUSEPORT``, see ``server.bind_sockets``), so what
must be coordinated is what they share besides the port:

* **The interception** (rules and addresses, ``netsetup``) is node state, not process state.  Each
  instance registers in a directory under ``--state-dir`` (one per network namespace, so the
  netns tests each get their own): a lock file that the instance holds with ``flock`` for its
  whole life, and a small JSON file saying ``starting``, ``serving``, ``stopping`` or ``failed``
  (alive and answering, but its install failed: it holds no share of the interception).  The kernel
  releases a flock when its holder dies, even by ``kill -9``, and flock works across PID
  namespaces (two pods are both PID 1), so "alive" is "its lock file is locked", never a PID
  check.  Membership changes and every decision about the interception (remove leftovers, remove
  the rules, tear down) happen under one directory-wide lock, so an exiting instance never tears
  down what a starting one has just installed: the last one out tears down, no one else does.
  What one instance changed on the node and the last one must undo (the ``route_localnet`` value
  found before dnat mode set it) is kept there too, in ``shared.json``.
* **Drift.**  Once installed, the rules and addresses are looked at every second (``watch``, one
  cheap listing, see ``netsetup.Interceptor.check``); what someone removed (another agent, the
  watchdog's teardown while we were stuck) is put back at once under the same lock, and /ready
  reports what is missing until then.
* **The queued queries.**  Closing a UDP socket of a ``SO_REUSEPORT`` group drops the datagrams
  already queued on it.  ``detach_udp`` connects the socket to its own address instead: in
  Linux 5.4 and later (commit acdcecc61285, "udp: correct reuseport selection with connected sockets") a
  connected socket only gets datagrams from its peer, so the kernel steers every new query to the
  other sockets of the group while the old process still reads and answers what it holds.  A TCP
  listener has no such switch: the old one accepts every connection already queued, then closes
  in the same breath (see ``server.DnsTcpServer.hand_over``).

Longer than most modules because the registry and this instance's share of the interception are
one protocol: every decision about the node (install, repair, hand over, tear down) is read
together with the lock and the states it is taken under.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gevent
import gevent.lock

from netsetup import InterceptError

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from netsetup import Interceptor

STARTING = "starting"
SERVING = "serving"
STOPPING = "stopping"
FAILED = "failed"  # alive and answering, without a share of the interception: its install failed
CHECK_MAX_AGE = 2.0  # seconds: /ready never reports a look at the rules older than this
LOCK_POLL = 0.01  # seconds between two tries of the directory lock (never a blocking flock in the loop)
LOCK_TIMEOUT = 60.0  # a holder runs at most a teardown (iptables -w 5 per call); beyond that, go on
QUIET_POLL = 0.02
TCP_LISTEN = "0A"  # include/net/tcp_states.h, as /proc/net/tcp prints it
UDP_UNCONNECTED = "07"  # TCP_CLOSE: a UDP socket that is bound but not connected


@dataclass(frozen=True)
class Instance:
    """One proxy process registered on the node."""

    id: str
    pid: int  # for humans only: pods have their own PID namespaces
    started: float  # wall clock, for "newer than"
    state: str


def netns_id() -> str:
    """The inode of our network namespace: instances in one namespace share the interception."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "default"


class InstanceRegistry:
    """Proxy instances of one network namespace, each alive while it holds the flock on its file."""

    def __init__(self, state_dir: str, log: FilteringBoundLogger, *, lock_timeout: float = LOCK_TIMEOUT) -> None:
        self.directory = Path(state_dir) / f"netns-{netns_id()}"
        self.log = log
        self.lock_timeout = lock_timeout
        self.started = time.time()
        # Wall-clock milliseconds first: names sort in start order, which helps a human reading the directory.
        self.id = f"{int(self.started * 1000)}-{os.getpid()}-{secrets.token_hex(4)}"
        self.state = STARTING
        self._lock_fd: int | None = None  # our own lock file, held for our whole life
        self._dir_depth = 0  # nesting of locked()
        self._holding = False  # the directory-wide flock is ours: stale files may be removed

    # -- the directory-wide lock --

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory-wide lock (re-entrant); waits by polling so the event loop keeps serving.

        Never raises for the lock itself: after LOCK_TIMEOUT, or if the directory cannot be used, it
        logs and goes on unlocked (and then removes no stale files), because a proxy that cannot
        stop would be worse than one that decides without the lock.
        """
        if self._dir_depth:
            self._dir_depth += 1
            try:
                yield
            finally:
                self._dir_depth -= 1
            return
        fd = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self.log.error("instance_lock_failed", directory=str(self.directory), error=str(exc))
        deadline = time.monotonic() + self.lock_timeout
        try:
            while fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._holding = True
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        # A holder stuck for a minute (stopped, not dead: death releases it).
                        self.log.error("instance_lock_timeout", directory=str(self.directory))
                        break
                    gevent.sleep(LOCK_POLL)
            self._dir_depth = 1
            yield
        finally:
            self._dir_depth = 0
            self._holding = False
            if fd is not None:
                os.close(fd)  # releases the flock

    # -- membership --

    def _paths(self, instance_id: str) -> tuple[Path, Path]:
        return self.directory / f"{instance_id}.lock", self.directory / f"{instance_id}.json"

    def register(self) -> None:
        """Add this process, state ``starting``; call under ``locked()``."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path, _ = self._paths(self.id)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        # Blocking is fine here: only a peer testing our liveness can hold it, for microseconds.
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd
        self.set_state(STARTING)

    def set_state(self, state: str) -> None:
        """Publish our state (atomically: readers see the old or the new file, never half of one)."""
        self.state = state
        if self._lock_fd is None:
            return
        _, json_path = self._paths(self.id)
        tmp = json_path.with_suffix(".tmp")
        body = {"id": self.id, "pid": os.getpid(), "started": self.started, "state": state}
        try:
            tmp.write_text(json.dumps(body))
            os.replace(tmp, json_path)
        except OSError as exc:  # e.g. the directory was removed: peers then read us as starting
            self.log.error("instance_state_not_written", state=state, error=str(exc))

    def unregister(self) -> None:
        """Remove this process; call under ``locked()`` so no one sees it half gone."""
        if self._lock_fd is None:
            return
        for path in self._paths(self.id):
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(self._lock_fd)
        self._lock_fd = None

    def peers(self) -> list[Instance]:
        """The other live instances, oldest first; under ``locked()`` the dead ones' files are removed."""
        found = []
        try:
            lock_files = sorted(self.directory.glob("*.lock"))
        except OSError:
            return []
        for lock_path in lock_files:
            instance_id = lock_path.stem
            if instance_id == self.id or lock_path.name == "lock":
                continue
            if not self._alive(lock_path):
                if self._holding:
                    # Stale: its holder died without unregistering (kill -9, OOM kill).
                    for path in self._paths(instance_id):
                        with contextlib.suppress(OSError):
                            path.unlink()
                    self.log.info("stale_instance_removed", instance=instance_id)
                continue
            found.append(self._read(instance_id))
        return sorted(found, key=lambda p: (p.started, p.id))

    def _alive(self, lock_path: Path) -> bool:
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # its holder lives
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def _read(self, instance_id: str) -> Instance:
        _, json_path = self._paths(instance_id)
        try:
            body = json.loads(json_path.read_text())
            return Instance(instance_id, int(body["pid"]), float(body["started"]), str(body["state"]))
        except (OSError, ValueError, KeyError, TypeError):
            # Between its lock file and its first state file: it is starting.
            return Instance(instance_id, 0, 0.0, STARTING)

    def holders(self) -> list[Instance]:
        """The other live instances that hold, or are about to hold, the interception (not the failed ones)."""
        return [peer for peer in self.peers() if peer.state != FAILED]

    # -- node state that outlives an instance --

    def read_shared(self) -> dict[str, Any]:
        """Node facts one instance learnt and the last one out needs (e.g. route_localnet before us)."""
        try:
            return json.loads((self.directory / "shared.json").read_text())
        except (OSError, ValueError):
            return {}

    def write_shared(self, facts: dict[str, Any]) -> None:
        """Replace the node facts; call under ``locked()``."""
        path = self.directory / "shared.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(facts))
            os.replace(tmp, path)
        except OSError as exc:
            self.log.error("instance_facts_not_written", error=str(exc))

    def keep_node_facts(self, interceptor: Interceptor) -> None:
        """After an install: note what the interceptor changed on the node, for the last one out; under ``locked()``."""
        before = interceptor.route_localnet_before
        facts = self.read_shared()
        if before is not None and "route_localnet_before" not in facts:
            facts["route_localnet_before"] = before
            self.write_shared(facts)

    def tear_down_last(self, interceptor: Interceptor) -> None:
        """The last one out: remove the interception and restore what any instance changed; under ``locked()``."""
        facts = self.read_shared()
        if interceptor.route_localnet_before is None and "route_localnet_before" in facts:
            interceptor.route_localnet_before = facts["route_localnet_before"]  # changed by a predecessor
        interceptor.teardown()
        if interceptor.route_localnet_before is None and facts:
            self.write_shared({})  # restored: nothing left to remember

    # -- questions the watchdog asks (it never registers) --

    def any_alive(self) -> bool:
        """Whether any instance holds its lock file: a live proxy, even a stopped (SIGSTOP) or hung one.

        Read-only: removes no stale file and takes no lock.  A directory that cannot be read counts as empty.
        """
        try:
            lock_files = list(self.directory.glob("*.lock"))
        except OSError:
            return False
        for lock_path in lock_files:
            if lock_path.name == "lock" or lock_path.stem == self.id:
                continue
            try:
                if self._alive(lock_path):
                    return True
            except OSError:  # unreadable: not proof of life
                continue
        return False

    # -- questions the proxy asks --

    def newer_starting(self) -> bool:
        """Whether an instance started after us is still starting (a readiness probe may be its own)."""
        return any(p.state == STARTING and (p.started, p.id) > (self.started, self.id) for p in self.peers())


@dataclass(frozen=True)
class InterceptionStatus:
    """What the last look at the node's interception found."""

    in_place: bool
    reason: str  # for /ready: "in place", what is missing, or why it is not installed
    checked_at: float  # monotonic


def _describe_missing(missing: list[str]) -> str:
    if not missing:
        return "in place"
    shown = ", ".join(missing[:3])
    return f"interception incomplete, {len(missing)} missing: {shown}{', ...' if len(missing) > 3 else ''}"


class NodeInterception:
    """This instance's share of the node's interception: the rules and addresses, and the registry
    of the instances that hold them together during a takeover.

    The proxy's lifecycle, in order: claim() before binding, install() once serving (again every
    --sync-interval while it failed), watch() every second, hand_over() on SIGTERM, release() when done.
    """

    def __init__(
        self,
        interceptor: Interceptor,
        registry: InstanceRegistry,
        log: FilteringBoundLogger,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interceptor = interceptor
        self.registry = registry
        self.log = log
        self.clock = clock
        self.installed = False  # our share is in place (or being repaired); False before and after a failure
        self._status = InterceptionStatus(False, "interception not installed yet", clock())
        self._leftovers_removed = False
        self._looking = gevent.lock.Semaphore()
        self._drift_logged = ""

    def claim(self) -> None:
        """Register on the node; alone, first remove the leftovers of a run killed with -9.

        With a live instance on the node (a takeover) its rules and addresses are ours as well and stay.
        A failure is logged and left to install(), which tries again and reports it.
        """
        with self.registry.locked():
            if self.registry.holders():
                self._leftovers_removed = True  # nothing there is a leftover: it is shared
            else:
                self._remove_leftovers()
            self.registry.register()

    def _remove_leftovers(self) -> None:
        try:
            self.interceptor.remove_leftovers()
            self._leftovers_removed = True
        except InterceptError as exc:
            self.log.warning("intercept_leftovers_not_removed", error=str(exc))

    def install(self, then: Callable[[], None] = lambda: None) -> bool:
        """Add the addresses, install the rules and call `then` (what must follow the addresses),
        then say "serving", all in one step under the node's lock: a predecessor deciding whether to
        hand over sees us either still starting or serving with the rules installed.

        On InterceptError (logged as ``intercept_failed``) nothing is left half installed: the
        backend is read before anything is added, and alone on the node what was added is removed.
        Then `then` is still called, our state is "failed" (peers neither wait for us nor leave the
        interception to us), status() gives the reason, and the result is False.  Raises OSError
        from `then`, after the same clean-up.
        """
        registry = self.registry
        with registry.locked():
            try:
                self.interceptor.detect_backend()  # before anything is added: unreadable, nothing changes
                if not self._leftovers_removed and not registry.holders():
                    self.interceptor.remove_leftovers()
                    self._leftovers_removed = True
                self._add_all()
            except InterceptError as exc:
                self.installed = False
                self._status = InterceptionStatus(False, f"interception not installed: {exc}", self.clock())
                registry.set_state(FAILED)
                self.log.error("intercept_failed", error=str(exc), action="serving, not ready, will retry")
                then()
                return False
            try:
                then()
            except OSError:
                if not registry.holders():
                    registry.tear_down_last(self.interceptor)
                raise
            registry.set_state(SERVING)
        self.installed = True
        self._status = InterceptionStatus(True, "in place", self.clock())
        return True

    def _add_all(self) -> None:
        try:
            self.interceptor.add_addresses()
            self.interceptor.install_rules()
            self.registry.keep_node_facts(self.interceptor)
        except InterceptError:
            if not self.registry.holders():
                self.registry.tear_down_last(self.interceptor)  # alone: nothing half installed
            raise

    def status(self, max_age: float = CHECK_MAX_AGE) -> InterceptionStatus:
        """The interception as last seen, looked at again first if that is older than `max_age` seconds."""
        if self.installed and self.clock() - self._status.checked_at > max_age:
            return self.look()
        return self._status

    def look(self) -> InterceptionStatus:
        """Look at the node's rules and addresses now; a caller arriving during a look shares its result."""
        if self._looking.locked():
            self._looking.wait()
            return self._status
        with self._looking:
            try:
                status = InterceptionStatus(
                    not (missing := self.interceptor.check()), _describe_missing(missing), self.clock()
                )
            except InterceptError as exc:
                status = InterceptionStatus(False, f"interception state unreadable: {exc}", self.clock())
            if self.installed:
                self._status = status
            return status

    def watch(self, full_sync: bool, dns_answers: Callable[[], bool]) -> None:
        """One round of the drift check: look, and restore what is missing under the node's lock.

        full_sync: restore even if the look found nothing (sync's ``-C`` per rule, every --sync-interval).
        dns_answers: whether our DNS path answers; a proxy that does not gets nothing diverted to it.
        """
        if not self.installed:
            return
        status = self.look()
        if status.in_place:
            self._drift_logged = ""
            if not full_sync:
                return
        elif status.reason != self._drift_logged:
            self._drift_logged = status.reason  # one line per change, not one a second
            self.log.warning("intercept_drift", missing=status.reason)
        if not dns_answers():
            self.log.error("intercept_repair_skipped", reason="dns loop not answering")
            return
        self.sync()

    def sync(self) -> None:
        """Restore missing rules and addresses (logged one by one), then look again."""
        with self.registry.locked():  # two instances of a takeover never insert the same rule twice
            self.interceptor.sync()
        self.look()

    def instances(self) -> int:
        """How many instances serve on the node, this one included."""
        return 1 + len(self.registry.peers())

    def newer_starting(self) -> bool:
        return self.registry.newer_starting()

    def hand_over(self, timeout: float) -> bool:
        """True when a successor serves and keeps the interception; else the rules are removed.

        A successor that registered but does not serve yet gets up to `timeout` seconds, during
        which we keep answering as before. The decision is taken under the node's lock, where the
        successor's "serving" means its rules are installed.
        """
        registry = self.registry
        registry.set_state(STOPPING)
        self.installed = False
        waited_until = time.monotonic() + timeout
        while time.monotonic() < waited_until:
            peers = registry.peers()
            if any(p.state == SERVING for p in peers) or not any(p.state == STARTING for p in peers):
                break
            gevent.sleep(0.05)
        with registry.locked():
            successors = [p.id for p in registry.peers() if p.state == SERVING]
            if successors:
                self.log.info("handover", successors=successors)
                return True
            # Alone, or the successor is late: new queries fall back to kube-dns at once while ours
            # drain; a successor that comes up later installs the rules again.
            self.interceptor.remove_rules()
            return False

    def release(self) -> None:
        """Leave the registry; the last one out removes the addresses, now that no answer is in flight."""
        with self.registry.locked():
            if not self.registry.holders():
                self.registry.tear_down_last(self.interceptor)
            self.registry.unregister()


# -- sockets --------------------------------------------------------------------------------------


def detach_udp(sock: socket.socket) -> None:
    """Take a UDP socket out of its SO_REUSEPORT group's steering; what it holds stays readable.

    Connected to its own address, it only matches datagrams sent from that address and port, which
    nobody sends (the group's sockets send answers to clients). Sending to other addresses with
    sendto() still works on Linux.
    """
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        peer = "::1" if host == "::" else host
    else:
        peer = "127.0.0.1" if host == "0.0.0.0" else host
    sock.connect((peer, port))


def queued_bytes(sock: socket.socket) -> int:
    """The size of the next queued datagram (FIONREAD), 0 when none is queued."""
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def wait_until_read(sock: socket.socket, deadline: float) -> bool:
    """Wait (yielding) until the socket's queue stays empty for two polls; False at the deadline."""
    quiet = 0
    while time.monotonic() < deadline:
        try:
            pending = queued_bytes(sock)
        except OSError:
            return True  # closed meanwhile: nothing left to read
        quiet = quiet + 1 if pending == 0 else 0
        if quiet >= 2:
            return True
        gevent.sleep(QUIET_POLL)
    return False


def _proc_address(text: str) -> tuple[str, int]:
    """An address:port as /proc/net/{udp,tcp}{,6} print it: 32-bit words in host byte order."""
    address, port = text.split(":")
    raw = b"".join(struct.pack("=I", int(address[i : i + 8], 16)) for i in range(0, len(address), 8))
    family = socket.AF_INET6 if len(raw) == 16 else socket.AF_INET
    return socket.inet_ntop(family, raw), int(port, 16)


def other_sockets(host: str, port: int, proto: str = "udp") -> int:
    """How many other sockets of this network namespace are bound to host:port (listening, for TCP).

    Read from /proc/net: a second proxy of the same user joins our SO_REUSEPORT group silently,
    so the proxy says so in its log (``listen_address_shared``).
    """
    v6 = ":" in host
    path = f"/proc/net/{proto}{'6' if v6 else ''}"
    wanted_state = UDP_UNCONNECTED if proto == "udp" else TCP_LISTEN
    family = socket.AF_INET6 if v6 else socket.AF_INET
    ours = (socket.inet_ntop(family, socket.inet_pton(family, host)), port)
    count = 0
    try:
        with open(path) as table:
            next(table, None)  # the header line
            for line in table:
                fields = line.split()
                if len(fields) > 3 and fields[3] == wanted_state and _proc_address(fields[1]) == ours:
                    count += 1
    except (OSError, ValueError):
        return 0  # no /proc (not Linux) or a format we do not know: the log line is only a courtesy
    return max(0, count - 1)
