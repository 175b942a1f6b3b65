"""Node faults around the interception: an iptables backend the container cannot read, rules that
went missing.  netsetup is driven here with a fake runner that answers each program from a table.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from typing import Any

import pytest

import netsetup
from test_netsetup import (
    CLUSTER_IP,
    LINK_LOCAL,
    TAG,
)

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
