"""Node network setup: interception addresses and iptables rules, their check, sync and teardown.

The proxy owns the node's DNS interception: it adds it when it can answer, looks at it every second
and restores what is missing (handover.NodeInterception.watch), and removes it on exit so that pods
fall back to kube-dns through kube-proxy.

Modes (``InterceptSpec.mode``):

* ``nodelocal`` (how NodeLocal DNSCache does it): every local IP (the link-local 169.254.20.10
  and the kube-dns ClusterIP; for IPv6 an address the operator picks, e.g. fd00::10, and the IPv6
  ClusterIP) is put as a /32 (/128) on a host interface, and for each of them raw-table
  NOTRACK rules (PREROUTING for pods, OUTPUT for the node itself and for our replies) plus
  filter-table ACCEPT rules are installed, the same 12 rules per IP as node-cache.  An untracked
  packet skips every NAT hook, so kube-proxy's DNAT of the ClusterIP never happens and the packet
  is delivered to our socket; there is no conntrack entry, hence no conntrack insert race (the
  "5 second DNS delay").  Removing the rules re-enables kube-proxy's DNAT at once: that is the
  fallback.  The interface is a dummy named ``interface`` where the kernel has the dummy driver;
  elsewhere the /32s go on ``lo``, which delivers locally just the same.
* ``dnat``: nat PREROUTING and OUTPUT rules DNAT UDP and TCP for the ClusterIPs (``local_ips``
  after the first) to ``dnat_target`` (default: the first local IP, put on the interface as
  above).  Inserted above kube-proxy's ``KUBE-SERVICES`` jump and kept there by ``sync``.
  Only a loopback target needs ``net.ipv4.conf.all.route_localnet=1`` (set then, with a warning
  about CVE-2020-8558, and restored on teardown).  UDP conntrack entries of the ClusterIP are
  flushed (``conntrack -D``) after install and teardown, else existing flows keep their old
  translation.
* ``none``: the operator intercepts; only leftovers carrying our tag are ever removed.

Ownership: every rule carries ``-m comment --comment TAG``; every address carries the label
``<device>:<tag prefix>`` (15 characters at most, IFNAMSIZ); a dummy interface we create carries
the interface alias TAG.  Teardown and leftover removal delete exactly what carries the tag, so a
restart after ``kill -9`` cleans up whatever the previous configuration was, and a rule or
address of anyone else is never touched.

iptables backend: decided once, like kubernetes-sigs/iptables-wrappers and kube-proxy.  The
kubelet (1.17+: ``KUBE-KUBELET-CANARY``, 1.24+: ``KUBE-IPTABLES-HINT``) leaves chains in the
mangle table of the backend kube-proxy uses; ``iptables-nft-save -t mangle`` is read first, then
``iptables-legacy-save -t mangle``, and the first one holding such a chain gives the binary.
With neither, the system's ``iptables`` (as installed: Debian's alternative) is used.  A backend
that is not installed, or whose mangle table does not exist, holds no hint; one that cannot be read
(e.g. "Permission denied" without NET_RAW or NET_ADMIN) stops the detection with BackendError: a
guess would put the rules where kube-proxy's filter table cannot see our ACCEPTs.  Rules of
the wrong backend would still hook netfilter but break ordering against kube-proxy's rules and
confuse other tools' backend detection (kubermatic/kubeone#1037).  A private nftables table was
the alternative; iptables was chosen because the filter ACCEPT rules must live in the backend
whose filter table may have a DROP policy, and because it needs no nft syntax per kernel.

Checking: ``check()`` reads the live state with one ``ip addr`` and one listing per chain (nft) or
per table (legacy), never one call per rule, and names what is missing; ``sync()`` restores it,
``-C`` before ``-I``, the ACCEPT and reply rules before the diverting ones.

Every command is an argv list run by an injectable runner (``subprocess.run`` by default; pass
``gevent.subprocess.run`` under gevent) with a timeout; iptables calls use ``-w 5`` so they
serialise on /run/xtables.lock with kube-proxy and the kubelet (legacy backend).
IPv6 and dual-stack: ``local_ips`` may hold IPv4 and IPv6 addresses; each gets the same rules in its
family's tables (``ip6tables*`` of the detected backend for IPv6, /128 instead of /32).  IPv6 addresses
are added with ``nodad`` (usable at once, no duplicate address detection) and, since the kernel keeps
address labels for IPv4 only, carry the route metric ``address_metric(tag)`` as their mark.  In dnat
mode each family has its own target (the first local IP of that family, or ``dnat_target`` for its
family); an IPv6 loopback target is rejected: IPv6 has no ``route_localnet``.  Teardown and leftover
removal look at both families' tables wherever ip6tables works.

One module, longer than the others, because both modes, both backends, the sync and the teardown
share one set of tagged rules: splitting them would spread what must stay symmetrical (every rule
that is installed is found and removed by the same description).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import subprocess
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

MODES = ("nodelocal", "dnat", "none")
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
KUBE_SERVICES_CHAIN = "KUBE-SERVICES"
LOOPBACK_DEVICE = "lo"
IFNAMSIZ_MAX = 15
IPTABLES_WAIT = "5"
# iptables -w 5 may wait 5 s for the xtables lock before doing anything.
COMMAND_TIMEOUT = 15.0
ROUTE_LOCALNET = "net.ipv4.conf.all.route_localnet"
# Chains that may hold our rules, in teardown order: the rules that divert queries go first so
# the fallback starts with the first deletion.
OUR_CHAINS = (
    ("raw", "PREROUTING"),
    ("nat", "PREROUTING"),
    ("raw", "OUTPUT"),
    ("nat", "OUTPUT"),
    ("filter", "INPUT"),
    ("filter", "OUTPUT"),
)
DIVERTING_CHAINS = (("raw", "PREROUTING"), ("nat", "PREROUTING"))
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class InterceptError(Exception):
    """A network setup step failed or a spec is invalid; the message names the step."""


class CommandNotFoundError(InterceptError):
    """The program of an argv is not installed."""


class BackendError(InterceptError):
    """The iptables backend cannot be decided: ``command`` could not be read, ``reason`` says why."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"iptables backend unknown: {command}: {reason}")
        self.command = command
        self.reason = reason


@dataclass(frozen=True)
class Rule:
    """One iptables (``family`` 4) or ip6tables (6) rule of ours, without the tag comment."""

    table: str
    chain: str
    match: tuple[str, ...]
    target: tuple[str, ...]
    family: int = 4

    def args(self, tag: str) -> list[str]:
        """Return the rule as iptables arguments after the chain name, tag comment included."""
        return [*self.match, "-m", "comment", "--comment", tag, "-j", *self.target]

    def describe(self) -> str:
        """Return a short human form for logs and sync reports."""
        prefix = "ip6 " if self.family == 6 else ""
        return f"{prefix}{self.table} {self.chain} {' '.join(self.match)} -j {' '.join(self.target)}"

    @property
    def key(self) -> tuple[int, str, str]:
        """Return (family, table, chain): where the rule lives."""
        return self.family, self.table, self.chain


@dataclass(frozen=True)
class InterceptSpec:
    """What to intercept and how; validated on creation (raises InterceptError)."""

    mode: str
    local_ips: tuple[str, ...]
    port: int = 53
    dnat_target: str | None = None
    interface: str = "nodelocaldns"
    health_port: int | None = None
    tag: str = "kube-dns-proxy"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InterceptError(f"intercept mode {self.mode!r} is not one of {', '.join(MODES)}")
        for ip in self.local_ips:
            _ip(ip, "local IP")
        if not 0 < self.port < 65536:
            raise InterceptError(f"port {self.port} out of range")
        if self.health_port is not None and not 0 < self.health_port < 65536:
            raise InterceptError(f"health port {self.health_port} out of range")
        if not _NAME_RE.match(self.tag) or len(self.tag) > 64:
            raise InterceptError(f"tag {self.tag!r} must be 1-64 of [A-Za-z0-9._-]")
        # The address label is "<interface>:<tag prefix>" and must fit IFNAMSIZ.
        if not _NAME_RE.match(self.interface) or len(self.interface) > IFNAMSIZ_MAX - 2:
            raise InterceptError(f"interface {self.interface!r} must be 1-13 of [A-Za-z0-9._-]")
        if self.mode == "nodelocal":
            if not self.local_ips:
                raise InterceptError("nodelocal mode needs at least one local IP")
            for ip in self.local_ips:
                address = ipaddress.ip_address(ip)
                if address.is_loopback or address.is_unspecified or address.is_multicast:
                    raise InterceptError(f"local IP {ip} cannot be put on an interface")
                if address.version == 6 and address.is_link_local:
                    # A pod's resolv.conf cannot name the zone (interface) an fe80:: address needs.
                    raise InterceptError(f"local IP {ip}: an IPv6 link-local address needs a zone; use a ULA")
        if self.mode == "dnat":
            if len(self.local_ips) < 2:
                raise InterceptError("dnat mode needs the proxy's IP and at least one ClusterIP to redirect")
            for family in self.families:
                if len(self._of_family(family)) < 2:
                    raise InterceptError(
                        f"dnat mode needs the proxy's IPv{family} address and at least one IPv{family} ClusterIP"
                    )
                host, _ = self.target_for(family)
                address = ipaddress.ip_address(host)
                if address.is_unspecified:
                    raise InterceptError(f"dnat target cannot be {host}")
                if address.version == 6 and address.is_loopback:
                    # IPv4 reaches 127/8 after DNAT only with route_localnet; IPv6 has no such switch
                    # and the kernel drops a packet from the wire to ::1 (RFC 4291 2.5.3).
                    raise InterceptError(
                        "dnat target ::1 is impossible: IPv6 has no route_localnet; "
                        "use the node-local IPv6 address (e.g. [fd00::10]:53)"
                    )

    @property
    def families(self) -> tuple[int, ...]:
        """Return the IP versions of the local IPs, 4 before 6."""
        return tuple(sorted({ipaddress.ip_address(ip).version for ip in self.local_ips}))

    def _of_family(self, family: int) -> tuple[str, ...]:
        return tuple(ip for ip in self.local_ips if ipaddress.ip_address(ip).version == family)

    def _explicit_target(self) -> tuple[str, int] | None:
        if self.dnat_target is None:
            return None
        text = self.dnat_target
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else (str(self.port) if not rest else "")
            if not sep:
                port = ""
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:
            host, port = text, str(self.port)
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InterceptError(f"dnat target {self.dnat_target!r} is not ADDRESS:PORT or [ADDRESS]:PORT")
        return _ip(host, "dnat target"), int(port)

    def target_for(self, family: int) -> tuple[str, int]:
        """Return the DNAT target of one IP version: ``dnat_target`` if of that version, else its first local IP."""
        explicit = self._explicit_target()
        if explicit is not None and ipaddress.ip_address(explicit[0]).version == family:
            return explicit
        own = self._of_family(family)
        if not own:
            raise InterceptError(f"no dnat target and no IPv{family} local IP")
        return own[0], self.port

    @property
    def target(self) -> tuple[str, int]:
        """Return the DNAT target of the first local IP's version as (address, port)."""
        if not self.local_ips:
            explicit = self._explicit_target()
            if explicit is None:
                raise InterceptError("no dnat target and no local IP")
            return explicit
        return self.target_for(ipaddress.ip_address(self.local_ips[0]).version)

    @property
    def target_is_loopback(self) -> bool:
        """Tell whether the IPv4 DNAT target is a 127/8 address (then route_localnet is needed)."""
        return self.mode == "dnat" and 4 in self.families and ipaddress.ip_address(self.target_for(4)[0]).is_loopback

    @property
    def cluster_ips(self) -> tuple[str, ...]:
        """Return the ClusterIPs the dnat mode redirects: every local IP but the first of its version."""
        return tuple(ip for family in self.families for ip in self._of_family(family)[1:])

    def wanted_addresses(self) -> tuple[str, ...]:
        """Return the host addresses (/32, /128) this mode puts on the interface."""
        if self.mode == "nodelocal":
            return self.local_ips
        if self.mode == "dnat":
            targets = [self.target_for(family)[0] for family in self.families]
            return tuple(ip for ip in targets if not ipaddress.ip_address(ip).is_loopback)
        return ()

    def rules(self) -> list[Rule]:
        """Return this mode's rules in install order: the diverting ones last."""
        if self.mode == "nodelocal":
            return _nodelocal_rules(self)
        if self.mode == "dnat":
            return _dnat_rules(self)
        return []


def _ip(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise InterceptError(f"{what} {text!r} is not an IP address") from None


def family_of(ip: str) -> int:
    """Return 4 or 6, the version of an address (no prefix length)."""
    return ipaddress.ip_address(ip).version


def host_prefix(ip: str) -> str:
    """Return the address as a host prefix: /32 for IPv4, /128 for IPv6."""
    return f"{ip}/32" if family_of(ip) == 4 else f"{ip}/128"


def address_metric(tag: str) -> int:
    """Return the route metric that marks our IPv6 addresses (the kernel keeps labels for IPv4 only).

    IFA_RT_PRIORITY (Linux 4.18+) is stored with the address and printed by ``ip -j addr``; it only
    orders the address's prefix route, which for a /128 changes nothing.  Derived from the tag so that
    two deployments with distinct tags do not take each other's addresses.
    """
    return 0x10000 + zlib.crc32(tag.encode()) % 0x7FFF0000


def _nodelocal_rules(spec: InterceptSpec) -> list[Rule]:
    # Same rules as node-cache's initIptables() (kubernetes/dns cmd/node-cache/app/cache_app.go).
    port = str(spec.port)
    support: list[Rule] = []
    diverting: list[Rule] = []
    for ip in spec.local_ips:
        host = host_prefix(ip)
        family = family_of(ip)
        for proto in ("tcp", "udp"):
            to_us = ("-d", host, "-p", proto, "-m", proto, "--dport", port)
            from_us = ("-s", host, "-p", proto, "-m", proto, "--sport", port)
            # Untracked packets never match "ctstate ESTABLISHED" accept rules: accept them here.
            support.append(Rule("filter", "INPUT", to_us, ("ACCEPT",), family))
            support.append(Rule("filter", "OUTPUT", from_us, ("ACCEPT",), family))
            support.append(Rule("raw", "OUTPUT", from_us, ("NOTRACK",), family))
            # PREROUTING for pods; OUTPUT for the node and hostNetwork pods (kubernetes/dns#319).
            diverting.append(Rule("raw", "PREROUTING", to_us, ("NOTRACK",), family))
            diverting.append(Rule("raw", "OUTPUT", to_us, ("NOTRACK",), family))
        if spec.health_port is not None:
            health = str(spec.health_port)
            support.append(
                Rule(
                    "raw",
                    "OUTPUT",
                    ("-d", host, "-p", "tcp", "-m", "tcp", "--dport", health),
                    ("NOTRACK",),
                    family,
                )
            )
            support.append(
                Rule(
                    "raw",
                    "OUTPUT",
                    ("-s", host, "-p", "tcp", "-m", "tcp", "--sport", health),
                    ("NOTRACK",),
                    family,
                )
            )
    return support + diverting


def _dnat_rules(spec: InterceptSpec) -> list[Rule]:
    rules = []
    for ip in spec.cluster_ips:
        family = family_of(ip)
        host, port = spec.target_for(family)
        destination = f"{host}:{port}" if family == 4 else f"[{host}]:{port}"
        for chain in ("PREROUTING", "OUTPUT"):
            for proto in ("udp", "tcp"):
                match = ("-d", host_prefix(ip), "-p", proto, "-m", proto, "--dport", str(spec.port))
                target = ("DNAT", "--to-destination", destination)
                rules.append(Rule("nat", chain, match, target, family))
    return rules


def _comment(tokens: list[str]) -> str | None:
    for i, token in enumerate(tokens[:-1]):
        if token == "--comment":
            return tokens[i + 1]
    return None


def _option(tokens: list[str], name: str) -> str | None:
    for i, token in enumerate(tokens[:-1]):
        if token == name:
            return tokens[i + 1]
    return None


def _jump_above(listing: list[list[str]], ours: list[str]) -> bool:
    """Tell whether kube-proxy's KUBE-SERVICES jump comes before our rule ``ours`` in a chain's listing."""
    tag = _comment(ours)
    for tokens in listing:
        # Leniently ours (every token of ours, in any order): a listing that prints it differently
        # must not make the sync move it (delete, insert) at every round.
        if _comment(tokens) == tag and all(token in tokens for token in ours):
            return False
        if "-j" in tokens and tokens[tokens.index("-j") + 1 :][:1] == [KUBE_SERVICES_CHAIN]:
            return True
    return False


def _addresses(links: Iterable[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Map each IPv4 and IPv6 address of ``ip -j addr show``'s links to (device, label); IPv6 has no label."""
    found = {}
    for link in links:
        for info in link.get("addr_info", []):
            if info.get("family") in ("inet", "inet6"):
                found[str(ipaddress.ip_address(info["local"]))] = (link["ifname"], info.get("label", ""))
    return found


def address_label(device: str, tag: str) -> str:
    """Return the IPv4 address label that marks our addresses on ``device``."""
    return f"{device}:{tag}"[:IFNAMSIZ_MAX]


def _restore_line(args: list[str]) -> str:
    """One rule in iptables-restore's input: not a shell, so only double quotes group words (a comment
    with a space); single quotes or brackets would be taken literally."""
    return " ".join(f'"{arg}"' if any(c.isspace() for c in arg) or not arg else arg for arg in args)


def run_command(
    runner: Runner, argv: list[str], timeout: float = COMMAND_TIMEOUT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one argv (never a shell), `stdin` as its input, and return it; raise InterceptError if it cannot run."""
    try:
        if stdin is not None:
            return runner(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        return runner(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise InterceptError(f"{shlex.join(argv)}: no result after {timeout} s") from None
    except FileNotFoundError:
        raise CommandNotFoundError(f"{argv[0]}: not installed") from None
    except OSError as exc:
        raise InterceptError(f"{shlex.join(argv)}: {exc.strerror or exc}") from None


def detect_iptables(runner: Runner = subprocess.run) -> tuple[str, str]:
    """Return (iptables binary, reason): the backend whose mangle table has the kubelet's hint.

    Raises BackendError when a backend consulted before the decision cannot be read: without its
    listing, which backend kube-proxy uses is a guess.
    """
    absent = []
    for binary in ("iptables-nft", "iptables-legacy"):
        argv = [f"{binary}-save", "-t", "mangle"]
        try:
            proc = run_command(runner, argv)
        except CommandNotFoundError:
            absent.append(f"{binary} not installed")
            continue
        except InterceptError as exc:
            raise BackendError(shlex.join(argv), str(exc).removeprefix(f"{shlex.join(argv)}: ")) from None
        if proc.returncode != 0:
            error = proc.stderr.strip() or proc.stdout.strip() or "no message"
            if "Table does not exist" in error:
                # Legacy with no mangle table in this network namespace (module not loaded): unused.
                absent.append(f"{binary}: no mangle table")
                continue
            raise BackendError(shlex.join(argv), f"exit code {proc.returncode}: {error}")
        if any(chain in proc.stdout for chain in HINT_CHAINS):
            return binary, "kubelet hint chain in mangle table"
    return "iptables", "; ".join(["no kubelet hint chain: system default", *absent])


class Interceptor:
    """Adds, re-checks and removes the node's DNS interception described by an InterceptSpec."""

    def __init__(
        self,
        spec: InterceptSpec,
        log: Any,
        *,
        runner: Runner = subprocess.run,
        iptables: str | None = None,
    ) -> None:
        """Keep the spec; ``runner`` runs argv lists, ``iptables`` skips backend detection."""
        self.spec = spec
        self._log = log
        self._runner = runner
        self._iptables = iptables
        self._device: str | None = None
        self._route_localnet_before: str | None = None
        self._backend_error: str | None = None  # the last one logged: a failing detection logs once

    @property
    def route_localnet_before(self) -> str | None:
        """The route_localnet value found before we set it to 1 (None: we did not change it).

        Node state like the rules: an instance that takes over (handover.py) learns it from the one
        that changed it, so the last one out restores it.
        """
        return self._route_localnet_before

    @route_localnet_before.setter
    def route_localnet_before(self, value: str | None) -> None:
        self._route_localnet_before = value

    # -- commands ---------------------------------------------------------------------------

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return run_command(self._runner, argv)

    @property
    def iptables(self) -> str:
        """Return the iptables binary in use, detecting the backend on first use.

        Raises BackendError (logged as ``iptables_backend_unreadable`` once per distinct error) and
        detects again at the next use, so that a cause fixed later is noticed.
        """
        if self._iptables is None:
            try:
                binary, reason = detect_iptables(self._runner)
            except BackendError as exc:
                if str(exc) != self._backend_error:
                    self._backend_error = str(exc)
                    self._log.error("iptables_backend_unreadable", command=exc.command, reason=exc.reason)
                raise
            self._iptables, self._backend_error = binary, None
            self._log.info("iptables_backend", binary=binary, reason=reason)
        return self._iptables

    def detect_backend(self) -> str:
        """Return the iptables binary, detecting it now if needed; raise BackendError if unreadable."""
        return self.iptables

    def binary(self, family: int) -> str:
        """Return the iptables binary for IPv4 (4) or the ip6tables one of the same backend (6).

        One backend for both: kube-proxy and the kubelet use one (their hint chains are created in
        both families' mangle tables), so the IPv4 detection decides for IPv6 too.
        """
        binary = self.iptables
        return binary if family == 4 else binary.replace("iptables", "ip6tables", 1)

    def _ipt(self, table: str, *args: str, family: int = 4) -> subprocess.CompletedProcess[str]:
        return self._run([self.binary(family), "-w", IPTABLES_WAIT, "-t", table, *args])

    def _rule_exists(self, rule: Rule) -> bool:
        proc = self._ipt(rule.table, "-C", rule.chain, *rule.args(self.spec.tag), family=rule.family)
        if proc.returncode in (0, 1):
            return proc.returncode == 0
        raise InterceptError(f"iptables -C {rule.describe()}: {proc.stderr.strip()}")

    def _insert(self, rule: Rule) -> None:
        proc = self._ipt(rule.table, "-I", rule.chain, "1", *rule.args(self.spec.tag), family=rule.family)
        if proc.returncode != 0:
            raise InterceptError(f"iptables -I {rule.describe()}: {proc.stderr.strip()}")

    def _insert_all(self, rules: list[Rule]) -> None:
        """Insert rules at the top of their chains, in order, with one ``iptables-restore --noflush``.

        One process instead of one ``iptables -I`` per rule (24 in nodelocal mode: half a second at
        start, under the node's lock). The input holds the tables in the order of their first rule, so
        the filter ACCEPT rules are committed before the raw NOTRACK rules that need them. Where the
        restore binary is missing or refuses the input, the rules go in one by one as before.
        """
        for family in sorted({rule.family for rule in rules}):
            in_family = [rule for rule in rules if rule.family == family]
            tables: dict[str, list[Rule]] = {}
            for rule in in_family:
                tables.setdefault(rule.table, []).append(rule)
            lines = []
            for table, in_table in tables.items():
                lines.append(f"*{table}")
                lines += [_restore_line(["-I", rule.chain, "1", *rule.args(self.spec.tag)]) for rule in in_table]
                lines.append("COMMIT")
            argv = [f"{self.binary(family)}-restore", "-w", IPTABLES_WAIT, "--noflush"]
            try:
                proc = run_command(self._runner, argv, stdin="\n".join(lines) + "\n")
                error = proc.stderr.strip()[:500] if proc.returncode else None
            except CommandNotFoundError as exc:
                error = str(exc)
            if error is None:
                continue
            self._log.warning("iptables_restore_failed", command=argv[0], error=error)
            for rule in in_family:
                if not self._rule_exists(rule):
                    self._insert(rule)

    def _list_chain(self, table: str, chain: str, family: int = 4) -> list[list[str]]:
        proc = self._ipt(table, "-S", chain, family=family)
        if proc.returncode != 0:
            raise InterceptError(f"{self.binary(family)} -t {table} -S {chain}: {proc.stderr.strip()}")
        rules = []
        for line in proc.stdout.splitlines():
            if line.startswith("-A "):
                rules.append(shlex.split(line))
        return rules

    def _tagged(self, table: str, chain: str, family: int = 4) -> list[list[str]]:
        return [r for r in self._list_chain(table, chain, family) if _comment(r) == self.spec.tag]

    def _ipv6_tables_usable(self) -> bool:
        """Tell whether ip6tables can be used here (installed, IPv6 in the kernel), for teardown of IPv6 leftovers.

        A node without IPv6 has no IPv6 rule of ours to remove: it is skipped rather than reported.
        """
        if 6 in self.spec.families:
            return True
        try:
            proc = self._ipt("raw", "-S", "PREROUTING", family=6)
        except CommandNotFoundError:
            return False
        return proc.returncode == 0

    def _read_chains(self, keys: set[tuple[int, str, str]]) -> dict[tuple[int, str, str], list[list[str]]]:
        """List the rules of the chains ``keys``, the cheapest way for the backend.

        Measured with 20,000 rules in filter: iptables-nft-save fetches the whole ruleset whatever
        ``-t`` says (220 ms even for the empty raw table), while ``iptables-nft -S CHAIN`` fetches one
        chain (4 ms).  Legacy copies a whole table out of the kernel for any read: ``-save -t TABLE``
        does it once per table (2 ms for raw, 50 ms for that filter) and takes no xtables lock,
        where each ``-S`` would copy the table again and wait behind kube-proxy's iptables-restore.
        """
        listed: dict[tuple[int, str, str], list[list[str]]] = {key: [] for key in keys}
        if not self.iptables.endswith("-legacy"):
            for family, table, chain in sorted(keys):
                listed[(family, table, chain)] = self._list_chain(table, chain, family)
            return listed
        for family, table in sorted({(family, table) for family, table, _ in keys}):
            argv = [f"{self.binary(family)}-save", "-t", table]
            proc = self._run(argv)
            if proc.returncode != 0:
                raise InterceptError(f"{shlex.join(argv)}: {proc.stderr.strip()}")
            for line in proc.stdout.splitlines():
                if line.startswith("-A "):
                    tokens = shlex.split(line)
                    if (family, table, tokens[1]) in listed:
                        listed[(family, table, tokens[1])].append(tokens)
        return listed

    def _links(self) -> list[dict[str, Any]]:
        proc = self._run(["ip", "-j", "-d", "addr", "show"])
        if proc.returncode != 0:
            raise InterceptError(f"ip addr show: {proc.stderr.strip()}")
        return json.loads(proc.stdout or "[]")

    def _local_addresses(self) -> dict[str, tuple[str, str]]:
        """Map each IPv4 and IPv6 address on the host to (device, label)."""
        return _addresses(self._links())

    # -- addresses --------------------------------------------------------------------------

    def _choose_device(self, links: dict[str, dict[str, Any]]) -> str:
        """Return the interface for our /32s: our dummy if the kernel can, else lo."""
        if self._device is not None and self._device in links:
            return self._device
        # First use, or our dummy interface was deleted (the watchdog's teardown deletes it).
        self._device = None
        name = self.spec.interface
        link = links.get(name)
        if link is not None:
            # An empty interface has no IPv4 address and no global IPv6 one (the kernel adds fe80::).
            used = [a for a in link.get("addr_info", []) if a.get("scope") != "link"]
            if link.get("ifalias") == self.spec.tag or (not link.get("ifalias") and not used):
                # Ours, or an empty one left by a crash between "link add" and "set alias".
                self._own_link(name)
                self._device = name
            else:
                self._log.warning("interface_in_use", interface=name, fallback=LOOPBACK_DEVICE)
                self._device = LOOPBACK_DEVICE
            return self._device
        proc = self._run(["ip", "link", "add", name, "type", "dummy"])
        if proc.returncode == 0:
            self._own_link(name)
            self._device = name
        else:
            # e.g. "Unknown device type" without CONFIG_DUMMY: lo delivers locally just as well.
            self._log.info(
                "dummy_interface_unavailable",
                interface=name,
                error=proc.stderr.strip(),
                fallback=LOOPBACK_DEVICE,
            )
            self._device = LOOPBACK_DEVICE
        return self._device

    def _own_link(self, name: str) -> None:
        for argv in (
            ["ip", "link", "set", "dev", name, "alias", self.spec.tag],
            # Addresses on a down device get no local route.
            ["ip", "link", "set", "dev", name, "up"],
        ):
            proc = self._run(argv)
            if proc.returncode != 0:
                raise InterceptError(f"{shlex.join(argv)}: {proc.stderr.strip()}")

    def _ensure_addresses(self) -> list[str]:
        links = {link["ifname"]: link for link in self._links()}
        present = _addresses(links.values())
        added = []
        for device in sorted({present[ip][0] for ip in self.spec.wanted_addresses() if ip in present}):
            if "UP" not in links[device].get("flags", []):
                # Set down by someone: its addresses get no local route.
                argv = ["ip", "link", "set", "dev", device, "up"]
                proc = self._run(argv)
                if proc.returncode != 0:
                    raise InterceptError(f"{shlex.join(argv)}: {proc.stderr.strip()}")
                added.append(f"interface {device} up")
        missing = [ip for ip in self.spec.wanted_addresses() if ip not in present]
        if not missing:
            return added
        device = self._choose_device(links)
        label = address_label(device, self.spec.tag)
        for ip in missing:
            if family_of(ip) == 4:
                argv = ["ip", "addr", "add", host_prefix(ip), "dev", device, "label", label]
            else:
                # No label for IPv6 (IPv4 only in the kernel): the metric marks it ours.  nodad: the
                # address is usable at once, not "tentative" for a second of duplicate detection.
                argv = ["ip", "-6", "addr", "add", host_prefix(ip), "dev", device]
                argv += ["metric", str(address_metric(self.spec.tag)), "nodad"]
            proc = self._run(argv)
            # "Address already assigned": someone added it meanwhile, which is what we want.
            if proc.returncode != 0 and "already" not in proc.stderr:
                raise InterceptError(f"{shlex.join(argv)}: {proc.stderr.strip()}")
            added.append(f"address {host_prefix(ip)} on {device}")
        return added

    def add_addresses(self) -> None:
        """Put the mode's /32s on our dummy interface (or lo); idempotent."""
        added = self._ensure_addresses()
        if added:
            self._log.info("intercept_addresses_added", added=added, device=self._device)

    # -- rules ------------------------------------------------------------------------------

    def _ensure_route_localnet(self) -> list[str]:
        if not self.spec.target_is_loopback:
            return []
        proc = self._run(["sysctl", "-n", ROUTE_LOCALNET])
        if proc.returncode != 0:
            raise InterceptError(f"sysctl {ROUTE_LOCALNET}: {proc.stderr.strip()}")
        value = proc.stdout.strip()
        if value == "1":
            return []
        argv = ["sysctl", "-q", "-w", f"{ROUTE_LOCALNET}=1"]
        proc = self._run(argv)
        if proc.returncode != 0:
            raise InterceptError(f"{shlex.join(argv)}: {proc.stderr.strip()}")
        if self._route_localnet_before is None:
            self._route_localnet_before = value
        # DNAT to 127/8 from PREROUTING is dropped as martian without it; with it every
        # loopback listener of the node is reachable from its neighbours (CVE-2020-8558).
        self._log.warning(
            "route_localnet_enabled",
            sysctl=ROUTE_LOCALNET,
            cve="CVE-2020-8558",
            risk="loopback listeners of the node become reachable from the pod network",
            advice="use a non-loopback dnat target such as 169.254.20.10",
        )
        return [f"sysctl {ROUTE_LOCALNET}=1"]

    def _flush_conntrack(self, cluster_ip: str, reply_src: str | None = None) -> None:
        # Existing UDP flows keep their old DNAT until their entry expires: drop them so the
        # next packet is translated anew.  TCP is left alone: it would break live connections.
        argv = [
            "conntrack",
            "-D",
            "-f",
            "ipv6" if family_of(cluster_ip) == 6 else "ipv4",
            "-p",
            "udp",
            "--orig-dst",
            cluster_ip,
            "--orig-port-dst",
            str(self.spec.port),
        ]
        if reply_src is not None:
            argv += ["--reply-src", reply_src]
        try:
            proc = self._run(argv)
        except InterceptError as exc:
            self._log.warning("conntrack_flush_failed", error=str(exc))
            return
        # conntrack exits 1 when no entry matched.
        if proc.returncode not in (0, 1):
            self._log.warning("conntrack_flush_failed", error=proc.stderr.strip())

    def _ensure_rules(self) -> list[str]:
        restored = self._ensure_route_localnet()
        rules = self.spec.rules()
        listed = self._read_chains({rule.key for rule in rules})
        missing = [
            rule
            for rule in rules
            if ["-A", rule.chain, *rule.args(self.spec.tag)] not in listed[rule.key] and not self._rule_exists(rule)
        ]
        if missing:
            self._insert_all(missing)
            restored += [rule.describe() for rule in missing]
        if self.spec.mode == "dnat":
            listed = self._read_chains({rule.key for rule in rules})
            for rule in rules:
                if _jump_above(listed[rule.key], ["-A", rule.chain, *rule.args(self.spec.tag)]):
                    # kube-proxy re-inserted its jump above ours: move ours back on top.
                    self._delete_rule(rule.table, ["-A", rule.chain, *rule.args(self.spec.tag)], rule.family)
                    self._insert(rule)
                    restored.append(f"moved above {KUBE_SERVICES_CHAIN}: {rule.describe()}")
        return restored

    def install_rules(self) -> None:
        """Insert the mode's rules at the top of their chains (-C before -I); raise on failure."""
        if self.spec.mode == "none":
            return
        added = self._ensure_rules()
        if self.spec.mode == "dnat" and added:
            # Only when something changed: with every rule already there (a takeover, the previous
            # instance's), a flush would drop the translation of queries in flight, whose replies
            # would then leave with our address instead of the ClusterIP and be rejected.
            for ip in self.spec.cluster_ips:
                self._flush_conntrack(ip)
        self._log.info(
            "intercept_rules_installed",
            mode=self.spec.mode,
            iptables=self.iptables,
            rules=len(self.spec.rules()),
            added=len(added),
        )

    def sync(self) -> list[str]:
        """Restore missing addresses and rules; return what was restored (logs, never raises)."""
        if self.spec.mode == "none":
            return []
        restored: list[str] = []
        try:
            restored += self._ensure_addresses()
            restored += self._ensure_rules()
        except InterceptError as exc:
            self._log.error("intercept_sync_failed", error=str(exc), restored=restored)
            return restored
        for item in restored:
            self._log.info("intercept_restored", item=item)
        return restored

    def check(self) -> list[str]:
        """Return what of the mode is missing on the node, empty when all is in place; cheap.

        One ``ip addr`` and one listing per chain or table (see _read_chains) whatever the number of rules;
        ``-C`` only for a rule the listing does not show, in case iptables prints it differently.
        Raises InterceptError when the state cannot be read.
        """
        if self.spec.mode == "none":
            return []
        missing = []
        links = self._links()
        present = _addresses(links)
        up = {link["ifname"] for link in links if "UP" in link.get("flags", [])}
        for ip in self.spec.wanted_addresses():
            if ip not in present:
                missing.append(f"address {host_prefix(ip)}")
            elif present[ip][0] not in up:
                missing.append(f"interface {present[ip][0]} up")
        rules = self.spec.rules()
        listed = self._read_chains({rule.key for rule in rules})
        for rule in rules:
            line = ["-A", rule.chain, *rule.args(self.spec.tag)]
            if line not in listed[rule.key] and not self._rule_exists(rule):
                missing.append(rule.describe())
            elif self.spec.mode == "dnat" and _jump_above(listed[rule.key], line):
                missing.append(f"above {KUBE_SERVICES_CHAIN}: {rule.describe()}")
        if self.spec.target_is_loopback:
            proc = self._run(["sysctl", "-n", ROUTE_LOCALNET])
            if proc.returncode != 0 or proc.stdout.strip() != "1":
                missing.append(f"sysctl {ROUTE_LOCALNET}=1")
        return missing

    def rules_present(self) -> bool:
        """Tell whether every rule and address of the mode is in place (check() found nothing missing)."""
        try:
            return not self.check()
        except InterceptError as exc:
            self._log.warning("intercept_check_failed", error=str(exc))
            return False

    def has_tagged_rules(self) -> bool:
        """Tell whether any diverting rule with our tag is installed (cheap: two listings per family)."""
        if any(self._tagged(table, chain) for table, chain in DIVERTING_CHAINS):
            return True
        return self._ipv6_tables_usable() and any(self._tagged(table, chain, 6) for table, chain in DIVERTING_CHAINS)

    # -- removal ----------------------------------------------------------------------------

    def _delete_rule(self, table: str, tokens: list[str], family: int = 4) -> bool:
        proc = self._ipt(table, "-D", *tokens[1:], family=family)
        # 1: already gone, e.g. the watchdog and the proxy tearing down at once.
        if proc.returncode not in (0, 1):
            raise InterceptError(f"{self.binary(family)} -t {table} -D {shlex.join(tokens[1:])}: {proc.stderr.strip()}")
        return proc.returncode == 0

    def _remove_tagged_rules(self) -> tuple[int, list[str]]:
        removed = 0
        errors: list[str] = []
        flushed = set()
        try:
            self.detect_backend()  # once, not once per chain
        except BackendError as exc:
            return 0, [str(exc)]
        # IPv4 first, then IPv6 (leftovers of an earlier configuration included) where it exists.
        families = [4]
        try:
            if self._ipv6_tables_usable():
                families.append(6)
        except InterceptError as exc:
            errors.append(str(exc))
        for family in families:
            for table, chain in OUR_CHAINS:
                try:
                    tagged = self._tagged(table, chain, family)
                except InterceptError as exc:
                    errors.append(str(exc))
                    continue
                for tokens in tagged:
                    try:
                        removed += self._delete_rule(table, tokens, family)
                    except InterceptError as exc:
                        errors.append(str(exc))
                        continue
                    target = _option(tokens, "--to-destination")
                    cluster_ip = _option(tokens, "-d")
                    if target and cluster_ip and (cluster_ip, target) not in flushed:
                        flushed.add((cluster_ip, target))
                        self._flush_conntrack(cluster_ip.split("/")[0], target.rsplit(":", 1)[0].strip("[]"))
        return removed, errors

    def _remove_tagged_addresses(self) -> tuple[int, list[str]]:
        removed = 0
        errors = []
        links = self._links()
        metric = address_metric(self.spec.tag)
        for link in links:
            label = address_label(link["ifname"], self.spec.tag)
            for info in link.get("addr_info", []):
                ours_v4 = info.get("family") == "inet" and info.get("label") == label
                ours_v6 = info.get("family") == "inet6" and info.get("metric") == metric
                if not (ours_v4 or ours_v6):
                    continue
                argv = [
                    "ip",
                    "addr",
                    "del",
                    f"{info['local']}/{info['prefixlen']}",
                    "dev",
                    link["ifname"],
                ]
                proc = self._run(argv)
                if proc.returncode == 0:
                    removed += 1
                elif "Cannot assign" not in proc.stderr:
                    errors.append(f"{shlex.join(argv)}: {proc.stderr.strip()}")
        for link in links:
            if link.get("ifalias") == self.spec.tag and link["ifname"] != LOOPBACK_DEVICE:
                argv = ["ip", "link", "del", link["ifname"]]
                proc = self._run(argv)
                if proc.returncode != 0:
                    errors.append(f"{shlex.join(argv)}: {proc.stderr.strip()}")
        return removed, errors

    def _remove_tagged(self) -> tuple[int, int, list[str]]:
        # Rules first: with the rules gone the ClusterIP is DNATed by kube-proxy again even
        # while the address is still local; an address gone first would blackhole untracked
        # packets (kubernetes/dns commit 307d561).
        rules, rule_errors = self._remove_tagged_rules()
        if rule_errors:
            # Rules of ours may still divert: their addresses stay, so that the diverted queries
            # still end on this node (answered, or refused at once) rather than routed off it.
            return rules, 0, [*rule_errors, "addresses kept: rules may remain"]
        try:
            addresses, address_errors = self._remove_tagged_addresses()
        except InterceptError as exc:
            addresses, address_errors = 0, [str(exc)]
        self._device = None
        return rules, addresses, address_errors

    def remove_leftovers(self) -> None:
        """Remove every rule, address and interface carrying our tag; raise if one stays."""
        rules, addresses, errors = self._remove_tagged()
        if rules or addresses:
            self._log.info("intercept_leftovers_removed", rules=rules, addresses=addresses)
        if errors:
            raise InterceptError("; ".join(errors))

    def remove_rules(self) -> None:
        """Remove only our rules (new queries go to kube-dns at once); never raises.

        For a draining shutdown: remove_rules(), let in-flight queries finish (their replies
        still leave from our addresses), then teardown() removes the addresses.
        """
        try:
            rules, errors = self._remove_tagged_rules()
        except Exception as exc:  # boundary: runs on the way out and must finish
            rules, errors = 0, [repr(exc)]
        if errors:
            self._log.error("intercept_rules_removal_incomplete", errors=errors, rules=rules)
        else:
            self._log.info("intercept_rules_removed", rules=rules)

    def teardown(self) -> None:
        """Remove our rules, then our addresses, then restore route_localnet; never raises."""
        try:
            rules, addresses, errors = self._remove_tagged()
        except Exception as exc:  # boundary: teardown runs on the way out and must finish
            rules, addresses, errors = 0, 0, [repr(exc)]
        if self._route_localnet_before is not None:
            argv = ["sysctl", "-q", "-w", f"{ROUTE_LOCALNET}={self._route_localnet_before}"]
            try:
                proc = self._run(argv)
                if proc.returncode != 0:
                    errors.append(f"{shlex.join(argv)}: {proc.stderr.strip()}")
                else:
                    self._route_localnet_before = None
            except InterceptError as exc:
                errors.append(str(exc))
        if errors:
            self._log.error("intercept_teardown_incomplete", errors=errors, rules=rules, addresses=addresses)
        else:
            self._log.info("intercept_removed", rules=rules, addresses=addresses)
