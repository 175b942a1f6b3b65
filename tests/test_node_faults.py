"""Node faults around the interception, in the network-namespace lab of test_netsetup.py.

What an operator meets on a real node: an iptables backend the container cannot read, a rule or an
address removed by someone else (another agent, the watchdog's teardown), a resolver that never
answers.  Each test starts the real ``proxy.py --intercept nodelocal`` in the lab's node namespace
and watches /health and /ready from inside that namespace with the poller below.

Run as a script (``poll HOST PORT SECONDS``), this file is that poller: it asks /health and /ready
every 20 ms and prints one JSON line per round with the monotonic time (the clock is shared by every
process of the machine, so the test compares it with its own).
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gevent
import pytest

import handover
import netsetup
from servers import free_port
from test_netsetup import (
    ANSWER_KUBE_DNS,
    ANSWER_VIA_PROXY,
    CLUSTER_IP,
    HEALTH_PORT,
    LINK_LOCAL,
    TAG,
    Lab,
    proxy_argv,
    start_watchdog,
    wait_for,
)
from test_netsetup import lab as lab  # noqa: F401  (the node lab fixture)

THIS = Path(__file__).resolve()
POLL_INTERVAL = 0.02
SILENT_NAMESERVER = "169.254.96.53"  # routed to the kube-dns side, where nothing owns it: never answers
START_GOAL = 1.0  # seconds from the proxy's start to "serving" and /health 200
DRIFT_GOAL = 2.0  # seconds to notice (/ready 503) and to repair a removed rule or address


# -- the script side: the /health and /ready poller --------------------------------------------


def get(host: str, port: int, path: str) -> tuple[int | str, str]:
    """One GET with a 0.3 s timeout: (status, body) or ("error:Type", "")."""
    connection = http.client.HTTPConnection(host, port, timeout=0.3)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        return f"error:{type(exc).__name__}", ""
    finally:
        connection.close()


def poll(host: str, port: int, duration: float) -> None:
    """Print {"t", "health", "ready", "reason"} every POLL_INTERVAL for ``duration`` seconds."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        started = time.monotonic()
        health, _ = get(host, port, "/health")
        ready, reason = get(host, port, "/ready")
        print(json.dumps({"t": started, "health": health, "ready": ready, "reason": reason}), flush=True)
        time.sleep(max(0.0, started + POLL_INTERVAL - time.monotonic()))


# -- helpers ----------------------------------------------------------------------------------


def start_poller(lab: Lab, host: str = LINK_LOCAL, seconds: float = 40.0) -> Any:
    """Start the poller in the node namespace against the proxy's --http port on ``host``."""
    return lab.start(lab.node, "poller", [sys.executable, str(THIS), "poll", host, str(HEALTH_PORT), str(seconds)])


def rounds(poller: Any) -> list[dict[str, Any]]:
    """The poller's rounds so far."""
    lines = poller.log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def first(poller: Any, after: float, timeout: float, what: str, **wanted: Any) -> dict[str, Any]:
    """Wait for the first round started after ``after`` whose fields equal ``wanted``; return it."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [r for r in rounds(poller) if r["t"] > after and all(r[k] == v for k, v in wanted.items())]
        return bool(found)

    wait_for(seen, timeout, what)
    return found[0]


def events(proc: Any) -> list[dict[str, Any]]:
    """The JSON log lines a process wrote so far."""
    lines = proc.log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def start_proxy(
    lab: Lab, *, env: dict[str, str] | None = None, on_node_address: bool = False, sync_interval: float = 60
) -> Any:
    """Start proxy.py --intercept nodelocal in the node namespace, state in the lab's directory.

    on_node_address: --http on 0.0.0.0 (as the DaemonSet has it) rather than the link-local address,
    so that /ready stays reachable while the interception addresses are gone; and --sync-interval
    (default 60 s, so that only the one-second look can repair anything).
    """
    argv = [*proxy_argv("nodelocal"), "--state-dir", str(lab.workdir / "state")]
    if on_node_address:
        argv += ["--http", f"0.0.0.0:{HEALTH_PORT}", "--sync-interval", str(sync_interval)]
    if env:
        argv = ["env", *(f"{key}={value}" for key, value in env.items()), *argv]
    return lab.start(lab.node, "proxy", argv)


# -- A1: backend detection with a fake runner (unit) -------------------------------------------

PERMISSION_DENIED = {
    "iptables-nft-save": (
        4,
        "iptables-nft-save v1.8.9 (nf_tables): Could not fetch rule set generation id: "
        "Permission denied (you must be root)",
    ),
    "iptables-legacy-save": (
        1,
        "iptables-save v1.8.9 (legacy): Cannot initialize: Permission denied (you must be root)",
    ),
}
NO_HINT = "*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
HINT = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"


class FakeNode:
    """A runner for netsetup: answers each program from a table, records every argv it was given.

    ``programs`` maps a program name to its stdout (exit 0), to (exit code, stderr), or to an
    exception to raise (FileNotFoundError: not installed).
    """

    def __init__(self, programs: dict[str, Any]) -> None:
        self.programs = programs
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        outcome = self.programs.get(argv[0], "")
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, tuple):
            return subprocess.CompletedProcess(argv, outcome[0], "", outcome[1])
        return subprocess.CompletedProcess(argv, 0, outcome, "")

    def ran(self, *prefix: str) -> list[list[str]]:
        """The calls whose argv starts with ``prefix``."""
        return [argv for argv in self.calls if argv[: len(prefix)] == list(prefix)]


class _Log:
    """Collects (level, event, fields) like a structlog logger."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event, fields))

    def events(self, level: str | None = None) -> list[str]:
        return [event for lvl, event, _ in self.lines if level in (None, lvl)]


class TestBackendDetection:
    """detect_iptables: the kubelet's hint decides; a backend that cannot be read stops the guess."""

    @pytest.mark.parametrize(
        ("programs", "binary"),
        [
            ({"iptables-nft-save": HINT, "iptables-legacy-save": NO_HINT}, "iptables-nft"),
            ({"iptables-nft-save": NO_HINT, "iptables-legacy-save": HINT}, "iptables-legacy"),
            ({"iptables-nft-save": NO_HINT, "iptables-legacy-save": NO_HINT}, "iptables"),
            ({"iptables-nft-save": FileNotFoundError(), "iptables-legacy-save": HINT}, "iptables-legacy"),
            ({"iptables-nft-save": FileNotFoundError(), "iptables-legacy-save": FileNotFoundError()}, "iptables"),
            # nft holds the hint: legacy, which would fail, is never read.
            (
                {"iptables-nft-save": HINT, "iptables-legacy-save": PERMISSION_DENIED["iptables-legacy-save"]},
                "iptables-nft",
            ),
        ],
        ids=["nft-hint", "legacy-hint", "no-hint", "nft-absent", "none-installed", "nft-hint-legacy-unreadable"],
    )
    def test_backend_chosen(self, programs: dict[str, Any], binary: str) -> None:
        """The first readable backend holding a hint chain wins; a missing one is no error."""
        assert netsetup.detect_iptables(FakeNode(programs))[0] == binary

    def test_legacy_without_mangle_table_is_unused(self) -> None:
        """ "Table does not exist" from legacy means legacy is not in use, not that it is unreadable."""
        missing = (1, "iptables-save v1.8.9 (legacy): Cannot initialize: Table does not exist (do you need to insmod?)")
        node = FakeNode({"iptables-nft-save": NO_HINT, "iptables-legacy-save": missing})
        assert netsetup.detect_iptables(node) == (
            "iptables",
            "no kubelet hint chain: system default; iptables-legacy: no mangle table",
        )

    @pytest.mark.parametrize("unreadable", ["iptables-nft-save", "iptables-legacy-save"])
    def test_unreadable_backend_raises_with_command_and_reason(self, unreadable: str) -> None:
        """Permission denied on a backend read before the decision raises BackendError naming both."""
        node = FakeNode(
            {"iptables-nft-save": NO_HINT, "iptables-legacy-save": NO_HINT, unreadable: PERMISSION_DENIED[unreadable]}
        )
        with pytest.raises(netsetup.BackendError) as caught:
            netsetup.detect_iptables(node)
        code = PERMISSION_DENIED[unreadable][0]
        assert (caught.value.command, caught.value.reason.split(":")[0]) == (
            f"{unreadable} -t mangle",
            f"exit code {code}",
        )
        assert "Permission denied" in str(caught.value)

    def test_timeout_is_unreadable(self) -> None:
        """A read that times out (the xtables lock, a hung kernel) is an error, not a missing backend."""
        node = FakeNode({"iptables-nft-save": subprocess.TimeoutExpired(["iptables-nft-save"], 15)})
        with pytest.raises(netsetup.BackendError, match="no result after"):
            netsetup.detect_iptables(node)

    def test_exec_denied_is_unreadable(self) -> None:
        """An OSError other than not-installed (EACCES on exec) is an error too."""
        node = FakeNode({"iptables-nft-save": PermissionError(13, "Permission denied")})
        with pytest.raises(netsetup.BackendError, match="Permission denied"):
            netsetup.detect_iptables(node)


def _interceptor(node: FakeNode, log: _Log, mode: str = "nodelocal") -> netsetup.Interceptor:
    spec = netsetup.InterceptSpec(mode=mode, local_ips=(LINK_LOCAL, CLUSTER_IP))
    return netsetup.Interceptor(spec, log, runner=node)


class TestUnreadableBackend:
    """What the proxy does with an unreadable backend: one error line, nothing touched, retried."""

    def test_logged_once_per_distinct_error(self) -> None:
        """Repeated uses with the same failure log one iptables_backend_unreadable line, with command and reason."""
        log = _Log()
        interceptor = _interceptor(FakeNode({"iptables-legacy-save": PERMISSION_DENIED["iptables-legacy-save"]}), log)
        for _ in range(3):
            with pytest.raises(netsetup.BackendError):
                interceptor.detect_backend()
        (line,) = [fields for _, event, fields in log.lines if event == "iptables_backend_unreadable"]
        assert (line["command"], "Permission denied" in line["reason"]) == ("iptables-legacy-save -t mangle", True)

    def test_detected_again_once_readable(self) -> None:
        """A failed detection is not remembered: the next use detects again and can succeed."""
        node = FakeNode({"iptables-legacy-save": PERMISSION_DENIED["iptables-legacy-save"]})
        interceptor = _interceptor(node, _Log())
        with pytest.raises(netsetup.BackendError):
            interceptor.detect_backend()
        node.programs["iptables-legacy-save"] = HINT
        assert interceptor.detect_backend() == "iptables-legacy"

    def test_install_touches_nothing_and_reports(self, tmp_path: Path) -> None:
        """With an unreadable backend install() adds no address nor rule, says "failed", and /ready gets why."""
        node = FakeNode(
            {"iptables-nft-save": NO_HINT, "iptables-legacy-save": PERMISSION_DENIED["iptables-legacy-save"]}
        )
        log = _Log()
        registry = handover.InstanceRegistry(str(tmp_path), log)
        node_interception = handover.NodeInterception(_interceptor(node, log), registry, log)
        node_interception.claim()
        called_then = []
        installed = node_interception.install(then=lambda: called_then.append(True))
        changes = [argv for argv in node.calls if argv[0] == "ip" and argv[1:3] != ["-j", "-d"]]
        changes += [argv for argv in node.calls if "-I" in argv or "-D" in argv]
        status = node_interception.status()
        assert (installed, called_then, changes, registry.state) == (False, [True], [], handover.FAILED)
        assert status.in_place is False
        assert "iptables-legacy-save -t mangle" in status.reason and "Permission denied" in status.reason
        assert "intercept_failed" in log.events("error")

    def test_next_install_succeeds_once_readable(self, tmp_path: Path) -> None:
        """After a failed install, the next attempt (every --sync-interval) installs once the backend reads."""
        node = FakeNode(
            {"iptables-nft-save": NO_HINT, "iptables-legacy-save": PERMISSION_DENIED["iptables-legacy-save"]}
        )
        log = _Log()
        registry = handover.InstanceRegistry(str(tmp_path), log)
        node_interception = handover.NodeInterception(_interceptor(node, log), registry, log)
        node_interception.claim()
        failed = node_interception.install()
        node.programs["iptables-legacy-save"] = HINT
        installed = node_interception.install()
        assert (failed, installed, registry.state, node_interception.status().in_place) == (
            False,
            True,
            handover.SERVING,
            True,
        )

    def test_failed_instance_holds_nothing_for_its_peers(self, tmp_path: Path) -> None:
        """A failed instance is neither waited for as a starter nor counted as a holder of the interception."""
        older = handover.InstanceRegistry(str(tmp_path), _Log())
        with older.locked():
            older.register()
        older.set_state(handover.SERVING)
        time.sleep(0.01)
        failed = handover.InstanceRegistry(str(tmp_path), _Log())
        with failed.locked():
            failed.register()
        failed.set_state(handover.FAILED)
        assert (older.newer_starting(), older.holders(), len(older.peers())) == (False, [], 1)


def _links(*addresses: str, flags: tuple[str, ...] = ("LOOPBACK", "UP", "LOWER_UP")) -> str:
    info = [{"family": "inet", "local": ip, "prefixlen": 32, "label": "lo:kube-dns-pro"} for ip in addresses]
    return json.dumps([{"ifname": "lo", "flags": list(flags), "addr_info": info}])


class ListingNode(FakeNode):
    """A fake node: ``*-save -t TABLE`` and ``iptables* -S CHAIN`` list ``rules`` (kube-proxy's jump first
    in nat when ``jump_first``), ``-C`` finds nothing, ``ip -j -d addr show`` prints ``links``."""

    def __init__(self, rules: list[netsetup.Rule], links: str, *, jump_first: bool = False) -> None:
        super().__init__({"ip": links})
        self.rules = rules
        self.jump_first = jump_first

    def listing(self, table: str, chain: str | None = None) -> str:
        lines = [f"-A {chain} -j KUBE-SERVICES"] if self.jump_first and table == "nat" else []
        for rule in self.rules:
            if rule.table == table and chain in (None, rule.chain):
                lines.append(shlex.join(["-A", rule.chain, *rule.args(TAG)]))
        return "\n".join([f"*{table}", *lines, "COMMIT", ""])

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if argv[0].startswith("iptables"):
            self.calls.append(argv)
            if argv[0].endswith("-save"):
                return subprocess.CompletedProcess(argv, 0, self.listing(argv[2]), "")
            if "-S" in argv:
                return subprocess.CompletedProcess(argv, 0, self.listing(argv[argv.index("-t") + 1], argv[-1]), "")
            return subprocess.CompletedProcess(argv, 1, "", "")  # -C: no such rule
        return super().__call__(argv, **kwargs)


def _checker(mode: str, node: ListingNode, iptables: str = "iptables-nft") -> netsetup.Interceptor:
    spec = netsetup.InterceptSpec(mode=mode, local_ips=(LINK_LOCAL, CLUSTER_IP))
    return netsetup.Interceptor(spec, _Log(), runner=node, iptables=iptables)


class TestCheck:
    """Interceptor.check: one listing per chain (nft) or table (legacy) and one of the addresses, never one per rule."""

    def rules(self, mode: str) -> list[netsetup.Rule]:
        return netsetup.InterceptSpec(mode=mode, local_ips=(LINK_LOCAL, CLUSTER_IP)).rules()

    @pytest.mark.parametrize(
        ("iptables", "reads"),
        [
            (
                "iptables-nft",
                [["-t", "filter", "-S", "INPUT"], ["-t", "filter", "-S", "OUTPUT"]]
                + [["-t", "raw", "-S", "OUTPUT"], ["-t", "raw", "-S", "PREROUTING"]],
            ),
            ("iptables-legacy", [["iptables-legacy-save", "-t", "filter"], ["iptables-legacy-save", "-t", "raw"]]),
        ],
    )
    def test_in_place_costs_one_read_per_chain_or_table(self, iptables: str, reads: list[list[str]]) -> None:
        """All in place: nothing missing, after one ip addr and one read per chain (nft) or per table (legacy)."""
        node = ListingNode(self.rules("nodelocal"), _links(LINK_LOCAL, CLUSTER_IP))
        missing = _checker("nodelocal", node, iptables).check()
        assert (missing, node.calls[0][:3], [argv[-4:] if "-S" in argv else argv for argv in node.calls[1:]]) == (
            [],
            ["ip", "-j", "-d"],
            reads,
        )

    def test_missing_rule_address_and_down_interface_named(self) -> None:
        """A rule absent from the listing (and from -C), an absent address and a down interface are each named."""
        rules = self.rules("nodelocal")
        node = ListingNode(rules[:-1], _links(LINK_LOCAL, flags=("LOOPBACK",)))
        assert _checker("nodelocal", node).check() == [
            "interface lo up",
            f"address {CLUSTER_IP}/32",
            rules[-1].describe(),
        ]

    def test_dnat_rule_below_kube_services_named(self) -> None:
        """In dnat mode a KUBE-SERVICES jump above our DNAT counts as missing: kube-proxy's would win."""
        node = ListingNode(self.rules("dnat"), _links(LINK_LOCAL), jump_first=True)
        assert len([item for item in _checker("dnat", node).check() if item.startswith("above KUBE-SERVICES")]) == 4


# -- A: on a node ----------------------------------------------------------------------------


def logged(proc: Any, event: str) -> list[dict[str, Any]]:
    """The lines of ``proc``'s log with this event."""
    return [e for e in events(proc) if e.get("event") == event]


def diverting_rule(ip: str) -> netsetup.Rule:
    """The raw PREROUTING NOTRACK rule that sends pods' UDP queries for ``ip`` to the proxy."""
    spec = netsetup.InterceptSpec(mode="nodelocal", local_ips=(LINK_LOCAL, CLUSTER_IP))
    return next(
        rule
        for rule in spec.rules()
        if (rule.table, rule.chain) == ("raw", "PREROUTING") and f"{ip}/32" in rule.match and "udp" in rule.match
    )


def in_place(lab: Lab) -> bool:
    """Every rule (20: no health port on a local IP) and both addresses of the proxy are on the node."""
    tagged = lab.tagged()
    addresses = {ip for ip in (LINK_LOCAL, CLUSTER_IP) if any(item.startswith(f"address {ip} ") for item in tagged)}
    return lab.count_rules() == 20 and len(addresses) == 2


@pytest.mark.netns
@pytest.mark.timeout(90)
class TestInterceptionOnNode:
    """The real proxy in the lab: a backend it cannot read, and drift it repairs."""

    def test_unreadable_legacy_backend_not_ready_and_nothing_installed(self, lab: Lab, tmp_path: Path) -> None:
        """kube-proxy on legacy, legacy unreadable: one error naming the command, /ready 503 with it, nothing installed.

        "Unreadable" is simulated by a PATH shim named iptables-legacy-save that prints what iptables
        prints without NET_RAW ("Permission denied (you must be root)") and exits 1.  The proxy keeps
        running (/health 200) and pods keep reaching kube-dns through kube-proxy.
        """
        lab.sh(lab.node, "iptables-legacy", "-w", "5", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
        shim = tmp_path / "shim"
        shim.mkdir()
        (shim / "iptables-legacy-save").write_text(
            "#!/bin/sh\n"
            'echo "iptables-save v1.8.9 (legacy): Cannot initialize: Permission denied (you must be root)" >&2\n'
            "exit 1\n"
        )
        (shim / "iptables-legacy-save").chmod(0o755)
        poller = start_poller(lab, host="127.0.0.1")
        started = time.monotonic()
        proxy = start_proxy(lab, env={"PATH": f"{shim}:{os.environ['PATH']}"}, on_node_address=True)
        not_ready = first(poller, started, 15, "/ready answers 503 with /health 200", ready=503, health=200)
        wait_for(lambda: bool(logged(proxy, "serving")), 10, "the proxy logs serving")
        (unreadable,) = logged(proxy, "iptables_backend_unreadable")
        assert (unreadable["level"], unreadable["command"]) == ("error", "iptables-legacy-save -t mangle")
        assert "Permission denied" in unreadable["reason"]
        assert "iptables-legacy-save -t mangle" in not_ready["reason"] and "Permission denied" in not_ready["reason"]
        assert logged(proxy, "serving")[0]["interception"] == "failed"
        assert (lab.tagged(), lab.dig(CLUSTER_IP, "fallback.example"), proxy.poll()) == ([], ANSWER_KUBE_DNS, None)

    def test_unreadable_backend_installed_at_a_later_attempt_once_readable(self, lab: Lab, tmp_path: Path) -> None:
        """Once legacy reads again, the attempt of the next --sync-interval installs in legacy and /ready is 200.

        The PATH shim of the test above first fails, then is replaced by one that runs the real
        iptables-legacy-save.
        """
        lab.sh(lab.node, "iptables-legacy", "-w", "5", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
        shim = tmp_path / "shim"
        shim.mkdir()
        save = shim / "iptables-legacy-save"
        save.write_text("#!/bin/sh\necho 'Cannot initialize: Permission denied (you must be root)' >&2\nexit 1\n")
        save.chmod(0o755)
        poller = start_poller(lab, host="127.0.0.1")
        proxy = start_proxy(lab, env={"PATH": f"{shim}:{os.environ['PATH']}"}, on_node_address=True, sync_interval=2)
        not_ready = first(poller, 0, 15, "/ready answers 503", ready=503)
        real = shutil.which("iptables-legacy-save")
        save.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
        first(poller, not_ready["t"], 10, "/ready answers 200", ready=200)
        assert (lab.count_rules("iptables-legacy-save"), lab.count_rules("iptables-nft-save")) == (20, 0)
        assert lab.dig(CLUSTER_IP, "recovered.example") == ANSWER_VIA_PROXY
        assert logged(proxy, "intercept_failed") and logged(proxy, "intercept_rules_installed")

    @pytest.mark.parametrize("what", ["rule", "address"])
    def test_removed_by_hand_noticed_and_repaired_within_2s(
        self, lab: Lab, what: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A diverting rule or an address deleted by hand: /ready 503 within 2 s, repaired and 200 again within 2 s."""
        poller = start_poller(lab, host="127.0.0.1")
        proxy = start_proxy(lab, on_node_address=True)
        first(poller, 0, 15, "/ready answers 200", ready=200)
        if what == "rule":
            rule = diverting_rule(CLUSTER_IP)
            removal = ["iptables", "-w", "5", "-t", rule.table, "-D", rule.chain, *rule.args(TAG)]
        else:
            device = lab.sh(lab.node, "ip", "-4", "-o", "addr", "show", "to", f"{CLUSTER_IP}/32").stdout.split()[1]
            removal = ["ip", "addr", "del", f"{CLUSTER_IP}/32", "dev", device]
        lab.sh(lab.node, *removal)
        removed = time.monotonic()
        not_ready = first(poller, removed, 5, "/ready answers 503", ready=503)
        ready_again = first(poller, not_ready["t"], 5, "/ready answers 200 again", ready=200)
        answer = lab.dig(CLUSTER_IP, "repaired.example")
        noticed, repaired = not_ready["t"] - removed, ready_again["t"] - removed
        with capsys.disabled():
            print(f"\n[{what} removed] /ready 503 after {noticed:.3f} s, repaired and 200 after {repaired:.3f} s")
        assert (noticed < DRIFT_GOAL, repaired < DRIFT_GOAL, answer, in_place(lab)) == (
            True,
            True,
            ANSWER_VIA_PROXY,
            True,
        )
        assert CLUSTER_IP in not_ready["reason"] and logged(proxy, "intercept_restored")

    def test_watchdog_teardown_while_stopped_undone_on_resume(
        self, lab: Lab, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Stopped until the watchdog tears down, then resumed: /health 200 at once, interception back within 2 s."""
        poller = start_poller(lab, host="127.0.0.1")
        proxy = start_proxy(lab, on_node_address=True)
        first(poller, 0, 15, "/ready answers 200", ready=200)
        dog = start_watchdog(lab, f"{LINK_LOCAL}:53")
        proxy.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: "interception_removed" in dog.log_path.read_text(), 10, "the watchdog tore down")
            fallback = lab.dig(CLUSTER_IP, "stopped.example")
        finally:
            resumed = time.monotonic()
            proxy.send_signal(signal.SIGCONT)
        wait_for(lambda: in_place(lab), 5, "the interception is back")
        back = time.monotonic() - resumed
        healthy = first(poller, resumed, 5, "/health answers 200", health=200)
        first(poller, resumed + back, 5, "/ready answers 200", ready=200)
        answer = lab.dig(CLUSTER_IP, "resumed.example")
        wait_for(lambda: dog.log_path.read_text().count("watchdog_armed") == 2, 5, "the watchdog re-armed")
        with capsys.disabled():
            print(
                f"\n[watchdog teardown, resumed] /health 200 after {healthy['t'] - resumed:.3f} s, "
                f"interception back within {back:.3f} s"
            )
        assert (fallback, answer, proxy.poll()) == (ANSWER_KUBE_DNS, ANSWER_VIA_PROXY, None)
        assert (back < DRIFT_GOAL, healthy["t"] - resumed < START_GOAL) == (True, True)


# -- B and C in-process: liveness and the HTTP server ------------------------------------------


@pytest.mark.e2e  # sockets on loopback, served by gevent in this process
class TestLivenessAndHttp:
    """/health asks a loopback socket of its own; the HTTP server starts without a name lookup."""

    def make_proxy(self) -> Any:
        import config
        import proxy

        argv = ["--listen", f"127.0.0.1:{free_port()}", "--upstream", f"127.0.0.1:{free_port()}"]
        return proxy.Proxy(config.build_config(argv, environ={}), _Log())

    def test_liveness_needs_no_listen_address_and_fails_when_not_served(self) -> None:
        """The check answers with every listen socket closed, and fails once the health socket is not read."""
        the_proxy = self.make_proxy()
        the_proxy.start()
        try:
            for server in the_proxy.servers:
                server.close()  # as if the listen addresses were gone
            without_listen = the_proxy.liveness()
            the_proxy.health_server.stop_accepting()  # the DNS loop no longer reads it
            unserved = the_proxy.liveness()
        finally:
            gevent.killall(the_proxy.background)
            the_proxy.health_server.close()
        assert (without_listen, unserved) == (True, False)

    def test_http_start_looks_up_no_name(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Starting the HTTP server never calls getfqdn (gevent's default SERVER_NAME is a reverse lookup)."""
        import gevent.socket

        import httpapi
        from config import Endpoint

        def no_lookup(name: str = "") -> str:
            raise AssertionError(f"getfqdn({name!r}) called")

        monkeypatch.setattr(gevent.socket, "getfqdn", no_lookup)
        api = httpapi.HttpApi(Endpoint("127.0.0.1", 0), lambda: True, lambda: (True, "ready"), _Log())
        api.start()
        try:
            assert api.server.environ["SERVER_NAME"] == "127.0.0.1"
        finally:
            api.stop()


# -- C: nothing at start needs DNS -------------------------------------------------------------


@pytest.mark.netns
@pytest.mark.timeout(90)
class TestStartWithoutDns:
    """The proxy's start and its HTTP server never wait for a name lookup."""

    def test_serving_and_healthy_within_a_second_with_a_silent_resolver(
        self, lab: Lab, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With a nameserver that never answers, "serving" and /health 200 come within 1 s of the start.

        ``ip netns exec`` runs every command of the node in a new mount namespace with
        /etc/netns/NODE/resolv.conf bind-mounted on /etc/resolv.conf (ip-netns(8)): that file names a
        link-local nameserver routed into the lab where nothing answers, so nothing leaves the machine.
        A reverse lookup there is checked to hang first, so the test cannot pass by accident.
        """
        resolv = Path("/etc/netns") / lab.node / "resolv.conf"
        resolv.write_text(f"nameserver {SILENT_NAMESERVER}\noptions timeout:2 attempts:1\n")
        before = time.monotonic()
        lab.sh(lab.node, "getent", "hosts", LINK_LOCAL, check=False)
        lookup_seconds = time.monotonic() - before
        poller = start_poller(lab)
        started = time.monotonic()
        proxy = start_proxy(lab)
        healthy = first(poller, started, 15, "/health answers 200", health=200)
        wait_for(lambda: any(e.get("event") == "serving" for e in events(proxy)), 15, "the proxy logs serving")
        serving = next(e for e in events(proxy) if e.get("event") == "serving")
        to_health = healthy["t"] - started
        with capsys.disabled():
            print(
                f"\n[silent resolver] reverse lookup took {lookup_seconds:.2f} s; proxy start -> /health 200: "
                f"{to_health:.3f} s (serving logged at {serving['timestamp']})"
            )
        assert (lookup_seconds > 1.5, to_health < START_GOAL) == (True, True)


if __name__ == "__main__":
    if sys.argv[1] != "poll":
        raise SystemExit(f"unknown command {sys.argv[1]!r}: poll")
    poll(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
