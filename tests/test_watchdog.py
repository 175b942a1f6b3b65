"""The watchdog only ever helps: dead vs stalled, standing down after a graceful exit, teardown under the node's lock.

Unit tests drive ``watchdog.Watchdog.step`` with a fake clock, prober, interceptor and registry.
Namespace tests use the lab of test_netsetup.py with the real proxy.py (or the stand-in responder)
and the real watchdog.py sharing one ``--state-dir``.

Run as a script (``lookups SERVER QNAME SECONDS EVERY TIMEOUT``), this file is the pod's lookup
loop for the stall test: one query every EVERY seconds, each on its own socket and thread, waiting
up to TIMEOUT for its answer; one JSON line per lookup.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import handover
import netsetup
import watchdog
from config import Config
from conftest import Clock
from test_manifests import config, container, find
from test_netsetup import (
    ANSWER_KUBE_DNS,
    ANSWER_LOCAL,
    ANSWER_VIA_PROXY,
    CLUSTER_IP,
    LINK_LOCAL,
    Lab,
    make_interceptor,
    outage_after_kill,
    query_once,
    start_proxy,
    start_stand_in,
    start_watchdog,
    wait_for,
)
from test_netsetup import lab as lab  # noqa: F401  (the node lab fixture)

THIS = Path(__file__).resolve()
KILL9_GOAL = 1.0  # seconds from kill -9 of the proxy to the pod answered by kube-dns
STALL = 1.5  # seconds the proxy is stopped (SIGSTOP) in the stall test
LOOKUP_TIMEOUT = 3.0  # a lookup unanswered after this has failed (a pod's stub waits 5 s on its first try)
Outcome = watchdog.Outcome


# -- fakes ------------------------------------------------------------------------------------


class FakeRegistry:
    """Stands for handover.InstanceRegistry: a live instance or none, and the node's lock."""

    def __init__(self, alive: bool = True) -> None:
        self.alive = alive
        self.held = False
        self.on_lock: Callable[[], None] | None = None  # what happens while we waited for the lock

    def any_alive(self) -> bool:
        return self.alive

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if self.on_lock is not None:
            self.on_lock()
        self.held = True
        try:
            yield
        finally:
            self.held = False


class FakeInterceptor:
    """Stands for netsetup.Interceptor: rules there or not; records whether each teardown held the lock."""

    def __init__(self, registry: FakeRegistry, rules: bool = True) -> None:
        self.registry = registry
        self.rules = rules
        self.teardowns: list[bool] = []  # registry.held at each teardown

    def has_tagged_rules(self) -> bool:
        return self.rules

    def teardown(self) -> None:
        self.teardowns.append(self.registry.held)
        self.rules = False


class FakeProber:
    """Answers each probe with the next scripted outcome (the last one repeats); a timeout takes its time."""

    def __init__(self, clock: Clock, *outcomes: Outcome) -> None:
        self.clock = clock
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self, address: tuple[str, int], qname: str, timeout: float) -> Outcome:
        self.calls += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if outcome is Outcome.TIMEOUT:
            self.clock.now += timeout
        return outcome


class RecordingLog:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.events.append((level, event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.events if name == event]

    def levels(self) -> set[str]:
        return {level for level, _, _ in self.events}


class Rig:
    """A watchdog on fakes, stepped as run() would, one interval (0.5 s) apart."""

    INTERVAL = 0.5

    def __init__(self, *outcomes: Outcome, alive: bool = True, rules: bool = True) -> None:
        self.clock = Clock(100.0)
        self.registry = FakeRegistry(alive)
        self.interceptor = FakeInterceptor(self.registry, rules)
        self.prober = FakeProber(self.clock, *outcomes)
        self.log = RecordingLog()
        self.dog = watchdog.Watchdog(
            self.interceptor,
            self.registry,
            ("127.0.0.1", 53),
            self.log,
            failures=2,
            timeout=0.3,
            stall_window=3.0,
            prober=self.prober,
            clock=self.clock,
        )
        self.dog.step()  # arms when rules are there
        self.prober.calls = 0

    def steps(self, count: int) -> None:
        for _ in range(count):
            started = self.clock.now
            self.dog.step()
            self.clock.now = max(self.clock.now, started + self.INTERVAL)

    def steps_for(self, seconds: float) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.steps(1)


# -- unit: the decisions ----------------------------------------------------------------------


@pytest.mark.unit
class TestDeadProxy:
    """Refused, or silent with no live instance: the interception goes after --failures probes."""

    def test_refused_probes_tear_down_as_dead(self) -> None:
        """Two refused probes tear down at once, even with an instance alive, and say cause=dead."""
        rig = Rig(Outcome.REFUSED, alive=True)
        rig.steps(2)
        (removed,) = rig.log.named("proxy_unresponsive_interception_removed")
        assert (rig.interceptor.teardowns, removed["cause"], removed["probe"]) == ([True], "dead", "refused")

    def test_one_refusal_is_not_enough(self) -> None:
        """A single refused probe below the threshold does not tear down."""
        rig = Rig(Outcome.REFUSED, Outcome.ANSWERED)
        rig.steps(3)
        assert (rig.interceptor.teardowns, rig.dog.failures) == ([], 0)

    def test_refusal_is_confirmed_soon(self) -> None:
        """After a refused probe the next one comes after CONFIRM_DELAY; after a timeout, a full interval."""
        refused, silent = Rig(Outcome.REFUSED), Rig(Outcome.TIMEOUT)
        refused.steps(1)
        silent.steps(1)
        assert (refused.dog.confirm_soon, silent.dog.confirm_soon) == (True, False)

    def test_silence_without_live_instance_is_dead(self) -> None:
        """Timeouts with no instance alive in the registry (flock released: killed) tear down after 2 probes."""
        rig = Rig(Outcome.TIMEOUT, alive=False)
        rig.steps(2)
        (removed,) = rig.log.named("proxy_unresponsive_interception_removed")
        assert (len(rig.interceptor.teardowns), removed["cause"], removed["probe"]) == (1, "dead", "timeout")

    def test_check_failure_does_not_spare_a_dead_proxy(self) -> None:
        """When the rules cannot be listed, a dead proxy's interception still goes."""
        rig = Rig(Outcome.REFUSED)

        def failing() -> bool:
            raise netsetup.InterceptError("iptables -S: lock held")

        rig.interceptor.has_tagged_rules = failing
        rig.steps(2)
        assert len(rig.interceptor.teardowns) == 1


@pytest.mark.unit
class TestStalledProxy:
    """Silent while its instance is alive (SIGSTOP): the interception stays for --stall-window."""

    def test_kept_within_the_window(self) -> None:
        """2.5 s of timeouts with the instance alive tear nothing down."""
        rig = Rig(Outcome.TIMEOUT, alive=True)
        rig.steps_for(2.5)
        assert (rig.interceptor.teardowns, rig.dog.failures >= 5) == ([], True)

    def test_removed_after_the_window(self) -> None:
        """Silent for the whole window, the stalled proxy loses its interception, cause=stalled."""
        rig = Rig(Outcome.TIMEOUT, alive=True)
        rig.steps_for(4.0)
        (removed,) = rig.log.named("proxy_unresponsive_interception_removed")
        assert (rig.interceptor.teardowns, removed["cause"], removed["silent_seconds"] >= 3.0) == (
            [True],
            "stalled",
            True,
        )

    def test_stall_that_ends_is_forgiven(self) -> None:
        """1.5 s of silence, then an answer: no teardown, the count restarts, proxy_answering_again logged."""
        rig = Rig(*[Outcome.TIMEOUT] * 3, Outcome.ANSWERED, alive=True)
        rig.steps(6)
        (again,) = rig.log.named("proxy_answering_again")
        assert (rig.interceptor.teardowns, rig.dog.failures, again["failures"]) == ([], 0, 3)

    def test_stalled_proxy_that_dies_is_dead(self) -> None:
        """A stall that ends in a refusal (killed while stopped) tears down without waiting out the window."""
        rig = Rig(Outcome.TIMEOUT, Outcome.TIMEOUT, Outcome.REFUSED, alive=True)
        rig.steps(3)
        (removed,) = rig.log.named("proxy_unresponsive_interception_removed")
        assert (removed["cause"], removed["silent_seconds"] < 3.0) == ("dead", True)


@pytest.mark.unit
class TestStandingDown:
    """Without the proxy's diverting rules there is nothing to undo: disarm quietly, never an error."""

    def test_graceful_exit_disarms_quietly(self) -> None:
        """No rules and no live instance (the proxy tore down and exited): disarmed, info only."""
        rig = Rig(Outcome.REFUSED)
        rig.interceptor.rules, rig.registry.alive = False, False
        rig.steps(4)
        (disarmed,) = rig.log.named("watchdog_disarmed")
        assert (rig.interceptor.teardowns, rig.dog.armed, rig.log.levels(), disarmed["instance_alive"]) == (
            [],
            False,
            {"info"},
            False,
        )

    def test_no_probe_while_disarmed(self) -> None:
        """Once it stood down, it does not probe until rules are installed again."""
        rig = Rig(Outcome.REFUSED, rules=True)
        rig.interceptor.rules = False
        rig.steps(5)
        assert rig.prober.calls == 1

    def test_draining_proxy_keeps_its_addresses(self) -> None:
        """No rules but an instance alive (removed its rules, drains before releasing): no teardown."""
        rig = Rig(Outcome.REFUSED)
        rig.interceptor.rules = False
        rig.steps(3)
        (disarmed,) = rig.log.named("watchdog_disarmed")
        assert (rig.interceptor.teardowns, disarmed["instance_alive"], "error" in rig.log.levels()) == (
            [],
            True,
            False,
        )

    def test_rearms_when_rules_are_back(self) -> None:
        """After standing down or a teardown, rules installed again re-arm it (and it probes again)."""
        rig = Rig(Outcome.REFUSED)
        rig.steps(2)
        rig.interceptor.rules = True
        rig.steps(1)
        assert (len(rig.interceptor.teardowns), rig.dog.armed, len(rig.log.named("watchdog_armed"))) == (1, True, 2)


@pytest.mark.unit
class TestTeardownUnderTheLock:
    """The teardown decision is taken again under the node's lock, where no install is half done."""

    def test_teardown_holds_the_lock(self) -> None:
        """The interceptor's teardown runs while the registry's node-wide lock is held."""
        rig = Rig(Outcome.REFUSED)
        rig.steps(2)
        assert rig.interceptor.teardowns == [True]

    def test_restarted_proxy_left_alone(self) -> None:
        """A proxy that restarted and installed while we waited for the lock answers the re-probe: no teardown."""
        rig = Rig(Outcome.REFUSED, Outcome.REFUSED, Outcome.ANSWERED)
        rig.registry.on_lock = lambda: setattr(rig.registry, "alive", True)
        rig.steps(2)
        (cancelled,) = rig.log.named("teardown_cancelled")
        assert (rig.interceptor.teardowns, rig.dog.armed, cancelled["reason"]) == ([], True, "proxy_answered")

    def test_restart_that_removed_leftovers_disarms(self) -> None:
        """A restarted proxy that removed the leftovers meanwhile leaves nothing to tear down: disarmed."""
        rig = Rig(Outcome.REFUSED)
        rig.registry.on_lock = lambda: setattr(rig.interceptor, "rules", False)
        rig.steps(2)
        assert (rig.interceptor.teardowns, rig.dog.armed, len(rig.log.named("watchdog_disarmed"))) == ([], False, 1)

    def test_new_live_instance_gets_the_stall_window(self) -> None:
        """Dead before the lock, a live but silent instance after it: postponed, then judged as stalled."""
        rig = Rig(Outcome.REFUSED, Outcome.REFUSED, Outcome.TIMEOUT, alive=False)
        rig.registry.on_lock = lambda: setattr(rig.registry, "alive", True)
        rig.steps(2)
        postponed = len(rig.log.named("teardown_postponed"))
        rig.steps(2)
        kept = list(rig.interceptor.teardowns)
        rig.steps_for(3.5)
        (removed,) = rig.log.named("proxy_unresponsive_interception_removed")
        assert (postponed, kept, removed["cause"]) == (1, [], "stalled")


# -- unit: registry helper, flags, manifest ----------------------------------------------------


def registered(directory: Path) -> handover.InstanceRegistry:
    """A registry of directory with one instance of this process registered in it."""
    registry = handover.InstanceRegistry(str(directory), structlog.get_logger())
    with registry.locked():
        registry.register()
    return registry


@pytest.mark.unit
class TestAnyAlive:
    """InstanceRegistry.any_alive: the watchdog's read-only view of the registry (files and flock)."""

    def test_registered_instance_is_alive(self, tmp_path: Path) -> None:
        """An instance holding its lock file is seen alive by a registry that never registered."""
        proxy = registered(tmp_path)
        try:
            assert handover.InstanceRegistry(str(tmp_path), structlog.get_logger()).any_alive() is True
        finally:
            proxy.unregister()

    def test_unregistered_instance_is_gone(self, tmp_path: Path) -> None:
        """After a graceful exit (unregister) nothing is alive."""
        registered(tmp_path).unregister()
        assert handover.InstanceRegistry(str(tmp_path), structlog.get_logger()).any_alive() is False

    def test_stale_lock_file_is_not_alive_and_stays(self, tmp_path: Path) -> None:
        """A lock file nobody holds (kill -9) is not alive, and the watchdog does not remove it."""
        watcher = handover.InstanceRegistry(str(tmp_path), structlog.get_logger())
        watcher.directory.mkdir(parents=True)
        stale = watcher.directory / "1-2-dead.lock"
        stale.touch()
        assert (watcher.any_alive(), stale.exists()) == (False, True)

    def test_missing_directory_is_empty(self, tmp_path: Path) -> None:
        """A state directory that does not exist reads as no instance alive."""
        assert handover.InstanceRegistry(str(tmp_path / "nope"), structlog.get_logger()).any_alive() is False


@pytest.mark.unit
class TestFlags:
    """The watchdog's new flags and their environment variables."""

    def test_state_dir_defaults_to_the_proxys(self) -> None:
        """Without --state-dir the watchdog uses the proxy's default registry directory."""
        assert watchdog.parse_args(["--probe", "127.0.0.1:53"]).state_dir == Config.state_dir

    def test_stall_window_defaults_to_3_s(self) -> None:
        """--stall-window defaults to 3 seconds."""
        assert watchdog.parse_args(["--probe", "127.0.0.1:53"]).stall_window == 3.0

    def test_flags_from_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """KUBE_DNS_PROXY_WATCHDOG_STATE_DIR and _STALL_WINDOW set the flags."""
        monkeypatch.setenv("KUBE_DNS_PROXY_WATCHDOG_STATE_DIR", "/run/elsewhere")
        monkeypatch.setenv("KUBE_DNS_PROXY_WATCHDOG_STALL_WINDOW", "5")
        args = watchdog.parse_args(["--probe", "127.0.0.1:53"])
        assert (args.state_dir, args.stall_window) == ("/run/elsewhere", 5.0)


@pytest.mark.unit
class TestManifest:
    """daemonset.yaml gives the watchdog the proxy's registry."""

    def test_watchdog_state_dir_is_the_proxys(self) -> None:
        """The watchdog's state dir comes from the ConfigMap's KUBE_DNS_PROXY_STATE_DIR."""
        env = {e["name"]: e for e in container("watchdog").get("env", [])}
        source = env["KUBE_DNS_PROXY_WATCHDOG_STATE_DIR"]["valueFrom"]["configMapKeyRef"]
        assert (source["name"], source["key"]) == (find("ConfigMap")["metadata"]["name"], "KUBE_DNS_PROXY_STATE_DIR")

    def test_both_containers_mount_one_state_volume_there(self) -> None:
        """Proxy and watchdog mount the same hostPath volume at the state dir."""
        pod = find("DaemonSet")["spec"]["template"]["spec"]
        state_dir = config()["KUBE_DNS_PROXY_STATE_DIR"]
        host_paths = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
        mounted = set()
        for name in ("kube-dns-proxy", "watchdog"):
            (mount,) = [m for m in container(name)["volumeMounts"] if m["mountPath"] == state_dir]
            mounted.add((mount["name"], host_paths[mount["name"]], mount.get("readOnly", False)))
        assert len(mounted) == 1 and None not in next(iter(mounted))


# -- the lookup loop (script side) ------------------------------------------------------------


def lookups(server: str, qname: str, seconds: float, every: float, timeout: float) -> None:
    """Start one lookup every ``every`` seconds for ``seconds``; print one JSON line per lookup when it ends."""
    printing = threading.Lock()

    def one() -> None:
        sent = time.monotonic()
        answer = query_once(server, qname, timeout)
        with printing:
            print(json.dumps({"sent": sent, "done": time.monotonic(), "answer": answer}), flush=True)

    threads = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        thread = threading.Thread(target=one)
        thread.start()
        threads.append(thread)
        time.sleep(every)
    for thread in threads:
        thread.join(timeout + 1)
    print("done", flush=True)


# -- the lab ----------------------------------------------------------------------------------


def node_registry(lab: Lab) -> handover.InstanceRegistry:
    """The registry the proxy and the watchdog of the lab's node namespace share, seen from this test."""
    registry = handover.InstanceRegistry(str(lab.workdir / "state"), structlog.get_logger())
    # The directory is named after the network namespace's inode: the node's, not this process's.
    registry.directory = lab.workdir / "state" / f"netns-{os.stat(f'/run/netns/{lab.node}').st_ino}"
    return registry


def log_events(proc: Any) -> list[dict[str, Any]]:
    """The JSON lines a lab process wrote so far."""
    lines = proc.log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def events_named(proc: Any, event: str) -> list[dict[str, Any]]:
    return [entry for entry in log_events(proc) if entry.get("event") == event]


def wait_answered_by_proxy(lab: Lab, timeout: float = 10) -> bool:
    """Wait until the pod's lookups are answered through the proxy again."""
    wait_for(lambda: lab.dig(CLUSTER_IP, "back.example") == ANSWER_VIA_PROXY, timeout, "answered by the proxy")
    return True


@pytest.mark.netns
@pytest.mark.timeout(120)
class TestWithTheProxy:
    """proxy.py and watchdog.py in the node namespace, one registry."""

    @pytest.mark.parametrize("mode", ["nodelocal", "dnat"])
    def test_kill9_back_to_kube_dns_under_1s(self, lab: Lab, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
        """After kill -9 of proxy.py the pod is answered by kube-dns in under a second."""
        proxy = start_proxy(lab, mode)
        dog = start_watchdog(lab, f"{LINK_LOCAL}:53")
        outage = outage_after_kill(lab, proxy)
        wait_for(lambda: events_named(dog, "proxy_unresponsive_interception_removed"), 5, "the teardown is logged")
        (removed,) = events_named(dog, "proxy_unresponsive_interception_removed")
        with capsys.disabled():
            print(f"\n[{mode}] kill -9 of proxy.py -> kube-dns answers after {outage:.3f} s ({removed['cause']})")
        assert (outage < KILL9_GOAL, removed["cause"]) == (True, "dead")

    def test_sigstop_for_1_5s_no_teardown_no_failed_lookup(self, lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
        """A proxy stopped for 1.5 s keeps its interception, and every lookup is answered by it within 3 s."""
        proxy = start_proxy(lab, "nodelocal")
        dog = start_watchdog(lab, f"{LINK_LOCAL}:53")
        meter = lab.start(
            lab.pod,
            "lookups",
            [sys.executable, str(THIS), "lookups", CLUSTER_IP, "stall.example", "4", "0.05", str(LOOKUP_TIMEOUT)],
        )
        time.sleep(1.0)
        proxy.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        time.sleep(STALL)
        proxy.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        meter.wait(timeout=20)
        time.sleep(0.6)  # one more probe round after the resume
        samples = [json.loads(line) for line in meter.log_path.read_text().splitlines() if line.startswith("{")]
        failed = [s for s in samples if s["answer"] != ANSWER_VIA_PROXY]
        during = [s for s in samples if stopped_at <= s["sent"] < resumed_at]
        slowest = max(s["done"] - s["sent"] for s in samples)
        levels = {entry.get("level") for entry in log_events(dog)}
        with capsys.disabled():
            print(
                f"\nSIGSTOP {STALL} s: {len(samples)} lookups, {len(during)} sent during the stall, "
                f"{len(failed)} failed, slowest {slowest:.3f} s; watchdog probe failures "
                f"{len(events_named(dog, 'probe_failed'))}, answering again: "
                f"{[e['silent_seconds'] for e in events_named(dog, 'proxy_answering_again')]}"
            )
        assert (failed, len(during) > 20, "error" in levels, len(events_named(dog, "proxy_answering_again"))) == (
            [],
            True,
            False,
            1,
        )
        assert lab.count_rules() > 0 and proxy.poll() is None

    def test_long_stall_torn_down_after_the_window(self, lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
        """A proxy stopped beyond --stall-window loses its interception (cause=stalled), regained once resumed."""
        proxy = start_proxy(lab, "nodelocal")
        dog = start_watchdog(lab, f"{LINK_LOCAL}:53")
        proxy.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            wait_for(lambda: events_named(dog, "proxy_unresponsive_interception_removed"), 10, "the teardown")
            torn_down_after = time.monotonic() - stopped_at
            fallback = lab.dig(CLUSTER_IP, "long-stall.example")
        finally:
            proxy.send_signal(signal.SIGCONT)
        (removed,) = events_named(dog, "proxy_unresponsive_interception_removed")
        # The proxy's sync puts its rules back; the watchdog re-arms.
        wait_for(lambda: len(events_named(dog, "watchdog_armed")) == 2, 10, "re-armed after the resume")
        with capsys.disabled():
            print(f"\nSIGSTOP until teardown: removed {torn_down_after:.2f} s after the stop ({removed['cause']})")
        assert (removed["cause"], removed["silent_seconds"] >= 3.0, fallback) == ("stalled", True, ANSWER_KUBE_DNS)
        assert wait_answered_by_proxy(lab)

    @pytest.mark.parametrize("mode", ["nodelocal", "dnat"])
    def test_graceful_exit_no_watchdog_error(self, lab: Lab, mode: str) -> None:
        """After SIGTERM the proxy's own teardown runs; the watchdog disarms with an info line and logs no error."""
        proxy = start_proxy(lab, mode)
        dog = start_watchdog(lab, f"{LINK_LOCAL}:53")
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=15) == 0
        wait_for(lambda: events_named(dog, "watchdog_disarmed"), 5, "the watchdog disarmed")
        time.sleep(1.0)  # a few more rounds: still quiet
        levels = [entry.get("level") for entry in log_events(dog)]
        assert ("error" in levels, "warning" in levels, lab.tagged(), lab.dig(CLUSTER_IP, "x.example")) == (
            False,
            False,
            [],
            ANSWER_KUBE_DNS,
        )


@pytest.mark.netns
@pytest.mark.timeout(90)
class TestLockedTeardown:
    """The watchdog's teardown waits for the node's lock, and spares what a proxy installed meanwhile."""

    def test_restart_during_teardown_leaves_complete_rules(self, lab: Lab) -> None:
        """A proxy restarting while the watchdog waits for the lock to tear down keeps every one of its rules."""
        first = start_stand_in(lab, "nodelocal")
        installer = make_interceptor(lab, "nodelocal")
        installer.add_addresses()
        installer.install_rules()
        dog = start_watchdog(lab, f"{LINK_LOCAL}:53")
        registry = node_registry(lab)
        with registry.locked():
            first.send_signal(signal.SIGKILL)
            wait_for(
                lambda: any(e.get("next") == "teardown" for e in events_named(dog, "probe_failed")),
                5,
                "the watchdog decided to tear down",
            )
            time.sleep(0.5)  # it now waits for the lock; nothing may have been removed
            untouched = lab.count_rules()
            # A proxy restarting, as proxy.py does under this lock: register, leftovers, bind, install.
            registry.register()
            start_stand_in(lab, "nodelocal")
            restarted = make_interceptor(lab, "nodelocal")
            restarted.remove_leftovers()
            restarted.add_addresses()
            restarted.install_rules()
            registry.set_state(handover.SERVING)
        try:
            wait_for(lambda: events_named(dog, "teardown_cancelled"), 5, "the watchdog spared the restarted proxy")
            time.sleep(0.6)
            complete = restarted.rules_present()
            answer = lab.dig(CLUSTER_IP, "race.example")
        finally:
            registry.unregister()
        expected = len(restarted.spec.rules())
        assert (untouched, complete, lab.count_rules(), answer) == (expected, True, expected, ANSWER_LOCAL)
        assert not events_named(dog, "proxy_unresponsive_interception_removed")


if __name__ == "__main__":
    if sys.argv[1] == "lookups":
        lookups(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}: lookups")
