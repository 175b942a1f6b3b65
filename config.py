"""Configuration: one frozen, typed Config built from flags and environment, validated in one place.

Longer than the other modules on purpose: the flag table (FLAGS), the parsers of each value, the
environment and --config file readers and the cross-checks must agree with each other, and one
file is where a reader checks that they do.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "KUBE_DNS_PROXY_"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53


class ConfigError(ValueError):
    """A flag, environment variable or file setting is invalid; the message is one line for the operator."""


@dataclass(frozen=True)
class Endpoint:
    """A host and port; host is an IP literal (v4 or v6, no brackets)."""

    host: str
    port: int

    @property
    def family_is_v6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family_is_v6 else f"{self.host}:{self.port}"


# Who may query us when --allow is not given: loopback, link-local, private and shared ranges
# (RFC 1918, RFC 6598, RFC 4193). Anything else gets REFUSED: never an open resolver.
DEFAULT_ALLOW = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "169.254.0.0/16",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "::1/128",
        "fe80::/10",
        "fc00::/7",
    )
)


@dataclass(frozen=True)
class Config:
    """Every setting of the proxy; seconds unless the name says otherwise."""

    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", DNS_PORT),)
    upstreams: tuple[Endpoint, ...] = ()
    resolv_conf: str = DEFAULT_RESOLV_CONF
    cache_size: int = 10000
    cache_file: str | None = None
    save_interval: float = 60.0
    min_ttl: int = 0
    max_ttl: int = 3600
    max_negative_ttl: int = 1800
    stale_ttl: int = 30
    max_stale: float = math.inf
    stale_answer_timeout: float = 1.8
    failure_recheck: float = 30.0
    down_probe_interval: float = 0.5
    recovery_refresh_rate: int = 200
    upstream_timeout: float = 2.0
    deadline: float = 4.0
    force_tcp: bool = False
    max_concurrent: int = 1000
    max_tcp_connections: int = 256
    tcp_idle_timeout: float = 10.0
    grace: float = 3.0
    handover_timeout: float = 10.0
    log_level: str = "info"
    log_queries: bool = False
    intercept: str = "none"
    local_ips: tuple[str, ...] = ()
    dnat_target: Endpoint | None = None
    sync_interval: float = 60.0
    state_dir: str = "/run/kube-dns-proxy"
    http: Endpoint | None = None
    summary_interval: float = 60.0
    no_metrics: bool = False
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = DEFAULT_ALLOW
    forward: tuple[ForwardZone, ...] = ()
    prefetch: int = 0
    prefetch_percent: int = 10
    prefer_positive: bool = False
    prefer_positive_grace: float = 30.0
    autopath: bool = False
    autopath_timeout: float = 1.0
    cluster_domain: str = "cluster.local."
    search: tuple[str, ...] | None = None  # None: the search line of --resolv-conf (filled in by _validate)
    config: str | None = None

    @property
    def serve_stale(self) -> bool:
        return self.max_stale > 0


@dataclass(frozen=True)
class _Flag:
    """One command-line flag: its Config field, how to parse it, and its help text."""

    field: str
    help: str
    parse: object = None  # callable str -> value; None for booleans
    repeatable: bool = False
    metavar: str | None = None
    env_separator: str | None = None  # between items of a repeatable flag's variable; None: commas or spaces
    doc_default: str | None = None  # the README's default column, when words say it better than the value

    @property
    def option(self) -> str:
        return "--" + self.field.replace("_", "-").replace("upstreams", "upstream").replace("local-ips", "local-ip")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.option[2:].replace("-", "_").upper()


def parse_endpoint(text: str) -> Endpoint:
    """Parse HOST, HOST:PORT, [V6] or [V6]:PORT into an Endpoint; the port defaults to 53."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"bad address {text!r}: missing ']'")
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise ConfigError(f"bad address {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"bad address {text!r}: host must be an IP address") from None
    port = DNS_PORT
    if port_text is not None:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(f"bad address {text!r}: port must be 0-65535")
        port = int(port_text)
    return Endpoint(host, port)


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a non-negative number of seconds")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise ValueError("must be more than 0")
    return value


MIN_DOWN_PROBE_INTERVAL = 0.1  # probes are per server and per node: thousands of nodes probe one kube-dns


def _probe_interval(text: str) -> float:
    value = _seconds(text)
    if value < MIN_DOWN_PROBE_INTERVAL:
        raise ValueError(f"must be at least {MIN_DOWN_PROBE_INTERVAL} seconds")
    return value


def _max_stale(text: str) -> float:
    if text.strip().lower() in ("unlimited", "inf", "infinite", "forever"):
        return math.inf
    return _seconds(text)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _ttl(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 2**31 - 1:
        raise ValueError("must be 0..2147483647")
    return value


def _log_level(text: str) -> str:
    level = text.lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError("must be debug, info, warning or error")
    return level


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError("must be a CIDR such as 10.0.0.0/8") from None


def _intercept_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in ("nodelocal", "dnat", "none"):
        raise ValueError("must be nodelocal, dnat or none")
    return mode


def _local_ip(text: str) -> str:
    # IPv4 or IPv6, without brackets or prefix length (the address itself goes on the node).
    try:
        return str(ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]")))
    except ValueError:
        raise ValueError("must be an IPv4 or IPv6 address") from None


def _non_negative_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _percent(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 99:
        raise ValueError("must be 1..99")
    return value


@dataclass(frozen=True)
class ForwardZone:
    """One --forward route: queries for `zone` and the names under it go to `upstreams`.

    force_tcp adds to --force-tcp; a TTL bound left None is the global one.
    """

    zone: str  # lower case, absolute: "cluster.local."
    upstreams: tuple[Endpoint, ...]
    force_tcp: bool = False
    min_ttl: int | None = None
    max_ttl: int | None = None
    max_negative_ttl: int | None = None

    def __str__(self) -> str:
        words = [self.zone + "=" + ",".join(str(e) for e in self.upstreams)]
        if self.force_tcp:
            words.append("force_tcp")
        words += [f"{name}={getattr(self, name)}" for name in _FORWARD_TTLS if getattr(self, name) is not None]
        return " ".join(words)


_FORWARD_TTLS = ("min_ttl", "max_ttl", "max_negative_ttl")
_FORWARD_SYNTAX = "ZONE=HOST[:PORT][,HOST...] [force_tcp] [min_ttl=S] [max_ttl=S] [max_negative_ttl=S]"


def _zone_name(text: str) -> str:
    zone = text.strip().lower()
    if zone != ".":
        labels = zone.removesuffix(".").split(".")
        # RFC 1035 §2.3.4: labels of 1-63 octets, 255 octets in all; ASCII only (IDNs in punycode).
        if (
            not zone.isascii()
            or any(not label or len(label) > 63 or any(c.isspace() for c in label) for label in labels)
            or len(zone) + 2 > 255
        ):
            raise ValueError("zone must be a domain name such as cluster.local")
        zone = ".".join(labels) + "."
    return zone


def _search_domain(text: str) -> str:
    """One --search domain, absolute and lower case; 'none' (an explicitly empty list) gives ""."""
    if text.strip().lower() == "none":
        return ""
    domain = _zone_name(text)
    if domain == ".":
        raise ValueError("must be a domain name such as corp.example.com, or none")
    return domain


def parse_forward(text: str) -> ForwardZone:
    """Parse one --forward value, ZONE=HOST[:PORT][,HOST...] then options separated by spaces.

    Options: force_tcp, min_ttl=S, max_ttl=S, max_negative_ttl=S (dashes allowed for underscores).
    Raises ValueError with a "must" message.
    """
    zone_text, sep, rest = text.strip().partition("=")
    if not sep or not zone_text.strip():
        raise ValueError(f"must be {_FORWARD_SYNTAX}")
    zone = _zone_name(zone_text)
    hosts: list[Endpoint] = []
    options: dict[str, object] = {}
    for word in rest.replace(",", " ").split():
        name, equals, value = word.partition("=")
        name = name.lower().replace("-", "_")
        if not equals and name == "force_tcp":
            options["force_tcp"] = True
        elif equals and name in _FORWARD_TTLS:
            options[name] = _ttl(value)
        elif equals:
            raise ValueError("options must be force_tcp, min_ttl=S, max_ttl=S or max_negative_ttl=S")
        else:
            try:
                hosts.append(parse_endpoint(word))
            except ConfigError as exc:
                raise ValueError(f"servers must be IP[:PORT] ({exc})") from None
    if not hosts:
        raise ValueError(f"must name at least one server: {_FORWARD_SYNTAX}")
    return ForwardZone(zone, tuple(hosts), **options)  # type: ignore[arg-type]


FLAGS: tuple[_Flag, ...] = (
    _Flag("listen", "address to serve DNS on, UDP and TCP (repeatable)", parse_endpoint, True, "HOST:PORT"),
    _Flag(
        "upstreams",
        "upstream server (repeatable); default: the nameservers of --resolv-conf",
        parse_endpoint,
        True,
        "HOST:PORT",
        doc_default="nameservers of `--resolv-conf`",
    ),
    _Flag("resolv_conf", "resolv.conf read when no --upstream is given", str, metavar="PATH"),
    _Flag("cache_size", "cache capacity in entries; only capacity evicts (LRU)", _count, metavar="N"),
    _Flag("cache_file", "file the cache is saved to and loaded from at start; none: off", str, metavar="PATH"),
    _Flag("save_interval", "save the cache to --cache-file this often", _positive_seconds, metavar="SECONDS"),
    _Flag("min_ttl", "lower bound on the time an answer is fresh", _ttl, metavar="SECONDS"),
    _Flag("max_ttl", "upper bound on the time a positive answer is fresh", _ttl, metavar="SECONDS"),
    _Flag(
        "max_negative_ttl",
        "upper bound on the time NXDOMAIN/NODATA is fresh (RFC 2308)",
        _ttl,
        metavar="SECONDS",
    ),
    _Flag("stale_ttl", "TTL put on stale answers (RFC 8767 suggests 30)", _ttl, metavar="SECONDS"),
    _Flag(
        "max_stale",
        "how long past expiry an entry may be served; 'unlimited' or 0 (off)",
        _max_stale,
        metavar="SECONDS",
    ),
    _Flag(
        "stale_answer_timeout",
        "wait this long for a refresh before answering stale (RFC 8767 client timer)",
        _seconds,
        metavar="SECONDS",
    ),
    _Flag(
        "failure_recheck",
        "after a failed refresh, answer stale at once and ask again at most this often",
        _positive_seconds,
        metavar="SECONDS",
    ),
    _Flag(
        "down_probe_interval",
        "while an upstream is marked down, ask it '. NS' this often, ±1/5 at random; its first reply ends the outage",
        _probe_interval,
        metavar="SECONDS",
    ),
    _Flag(
        "recovery_refresh_rate",
        "when an upstream is back, refresh the names answered stale meanwhile, most asked first, "
        "at most N a second; 0: off",
        _non_negative_count,
        metavar="N",
    ),
    _Flag("upstream_timeout", "timeout of one try to one upstream", _positive_seconds, metavar="SECONDS"),
    _Flag(
        "deadline",
        "overall time a miss may take before SERVFAIL (all tries)",
        _positive_seconds,
        metavar="SECONDS",
    ),
    _Flag("force_tcp", "forward every query over TCP"),
    _Flag(
        "max_concurrent",
        "queries handled at once beyond cache hits; more are dropped",
        _count,
        metavar="N",
    ),
    _Flag("max_tcp_connections", "client TCP connections open at once", _count, metavar="N"),
    _Flag("tcp_idle_timeout", "close an idle client TCP connection after", _positive_seconds, metavar="SECONDS"),
    _Flag("grace", "on SIGTERM, time in-flight queries get to finish", _seconds, metavar="SECONDS"),
    _Flag(
        "handover_timeout",
        "on SIGTERM, keep serving up to this long while a successor on the node is still starting",
        _seconds,
        metavar="SECONDS",
    ),
    _Flag("log_level", "debug, info, warning or error", _log_level, metavar="LEVEL"),
    _Flag("log_queries", "log one debug line per query (needs --log-level debug)"),
    _Flag(
        "intercept",
        "node DNS interception the proxy sets up and removes: nodelocal, dnat or none",
        _intercept_mode,
        metavar="MODE",
        doc_default="none",
    ),
    _Flag(
        "local_ips",
        "address put on the node for interception (repeatable): the link-local IP, then the kube-dns ClusterIP;"
        " IPv6 ones (e.g. fd00::10, then the IPv6 ClusterIP) too, for IPv6 and dual-stack",
        _local_ip,
        True,
        "IP",
    ),
    _Flag(
        "dnat_target",
        "dnat mode: where queries are redirected (default: first --local-ip)",
        parse_endpoint,
        metavar="HOST:PORT",
    ),
    _Flag(
        "sync_interval", "re-check interception rules and addresses this often", _positive_seconds, metavar="SECONDS"
    ),
    _Flag(
        "state_dir",
        "directory where instances on one node register, to share the interception during a takeover",
        str,
        metavar="PATH",
    ),
    _Flag("http", "serve /health and /ready (and more) over HTTP here; none: off", parse_endpoint, metavar="HOST:PORT"),
    _Flag("no_metrics", "skip the per-qtype, per-rcode and latency counts of cache hits (a few percent faster)"),
    _Flag(
        "summary_interval",
        "log one summary line (queries, hit ratio, stale answers, upstream state) this often; 0: never",
        _seconds,
        metavar="SECONDS",
    ),
    _Flag(
        "allow",
        "client network allowed to query (repeatable); others get REFUSED. Default: loopback, "
        "link-local, RFC 1918, RFC 6598 and RFC 4193 ranges",
        _network,
        True,
        "CIDR",
        doc_default="loopback, link-local, RFC 1918, RFC 6598, RFC 4193",
    ),
    _Flag(
        "forward",
        f"route a zone to its own servers (repeatable), the longest zone wins; other names go to --upstream: "
        f"'{_FORWARD_SYNTAX}'. In the environment, entries are separated by ';'",
        parse_forward,
        True,
        "ZONE=HOST[:PORT]",
        env_separator=";",
    ),
    _Flag(
        "prefetch",
        "refresh an entry asked at least N times during its life before it expires; 0: off",
        _non_negative_count,
        metavar="N",
    ),
    _Flag("prefetch_percent", "prefetch within the last PERCENT of an entry's TTL (1-99)", _percent, metavar="PERCENT"),
    _Flag(
        "prefer_positive",
        "while an upstream is down or just came back, an NXDOMAIN/NODATA does not replace a positive "
        "answer we hold: the positive one is served (stale if expired)",
    ),
    _Flag(
        "prefer_positive_grace",
        "how long after an upstream comes back --prefer-positive still holds",
        _seconds,
        metavar="SECONDS",
    ),
    _Flag(
        "autopath",
        "when a pod's first ndots:5 search candidate (A/AAAA of NAME.NAMESPACE.svc.CLUSTER-DOMAIN) is NXDOMAIN, "
        "answer a CNAME to the first later candidate that exists, as the pod's own search would have",
    ),
    _Flag(
        "autopath_timeout",
        "--autopath gives up (the plain NXDOMAIN) when the walk would take longer than this",
        _positive_seconds,
        metavar="SECONDS",
    ),
    _Flag("cluster_domain", "the cluster's DNS domain (the kubelet's --cluster-domain)", _zone_name, metavar="DOMAIN"),
    _Flag(
        "search",
        "the node's search domains (repeatable), which pods inherit after the cluster ones; none: no domain",
        _search_domain,
        True,
        "DOMAIN",
        doc_default="the `search` line of `--resolv-conf`",
    ),
    _Flag(
        "config",
        "YAML file of settings (keys are flag names); flags win over it, it wins over the environment; "
        "re-read when it changes and on SIGHUP",
        str,
        metavar="PATH",
    ),
)


def flag_table() -> str:
    """The README's Markdown table of FLAGS: flag, environment variable, default, meaning (./dev.sh docs)."""
    defaults = Config()
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for flag in FLAGS:
        name = f"`{flag.option} {flag.metavar}`" if flag.metavar else f"`{flag.option}`"
        if flag.repeatable:
            name += " (repeatable)"
        default = getattr(defaults, flag.field)
        if flag.doc_default is not None:
            default_text = flag.doc_default
        elif flag.parse is None:
            default_text = "on" if default else "off"
        elif default is None or default == ():
            default_text = "none"
        elif default == math.inf:
            default_text = "`unlimited`"
        elif isinstance(default, tuple):
            default_text = f"`{','.join(str(item) for item in default)}`"
        else:
            default_text = f"`{default}`"
        cells = [name, f"`{flag.env}`", default_text, flag.help]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = _ArgumentParser(
        prog="proxy.py",
        description="Per-node caching DNS proxy for Kubernetes that keeps serving stale answers "
        "while its upstream (kube-dns) cannot be reached.",
        epilog="Every flag can also be set by its environment variable (shown in brackets); "
        "flags win. Repeatable flags take a comma-separated list in the environment.",
    )
    for flag in FLAGS:
        default = getattr(defaults, flag.field)
        if isinstance(default, tuple):
            default_text = ",".join(str(e) for e in default) or "none"
        elif default == math.inf:
            default_text = "unlimited"
        elif default is None:
            default_text = "none"
        else:
            default_text = str(default)
        help_text = f"{flag.help} [{flag.env}] (default: {default_text})"
        if flag.parse is None:
            parser.add_argument(flag.option, dest=flag.field, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                flag.option,
                dest=flag.field,
                action="append" if flag.repeatable else "store",
                default=None,
                metavar=flag.metavar,
                help=help_text,
            )
    return parser


def _convert(flag: _Flag, raw: str, source: str) -> object:
    try:
        return flag.parse(raw)  # type: ignore[operator]
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValueError as exc:
        reason = str(exc) if "must" in str(exc) else "invalid value"
        raise ConfigError(f"{source} {raw!r}: {reason}") from None


def _truthy(raw: str, source: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{source} {raw!r}: expected true or false")


def read_resolv_conf_nameservers(path: str) -> list[Endpoint]:
    """Return the nameserver lines of a resolv.conf as endpoints on port 53 (unreadable file: none)."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        servers.append(parse_endpoint(parts[1].split("%")[0]))
                    except ConfigError:
                        continue
    except OSError:
        return []
    return servers


def read_resolv_conf_search(path: str) -> tuple[str, ...]:
    """The search domains of a resolv.conf, absolute and lower case (the last search or domain line wins, as
    in glibc); none for an unreadable file."""
    domains: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in ("search", "domain"):
                    domains = []
                    for part in parts[1:]:
                        try:
                            domain = _zone_name(part)
                        except ValueError:
                            continue
                        if domain != ".":
                            domains.append(domain)
    except OSError:
        return ()
    return tuple(domains)


def _is_own_listen_address(upstream: Endpoint, listen: Sequence[Endpoint]) -> bool:
    for endpoint in listen:
        if endpoint.port != upstream.port:
            continue
        if endpoint.host == upstream.host:
            return True
        if ipaddress.ip_address(endpoint.host).is_unspecified and ipaddress.ip_address(upstream.host).is_loopback:
            return True
    return False


UPSTREAM_PLACEHOLDER = "__PILLAR__CLUSTER__DNS__"
# The kubelet's variable for the manifest's Service kube-dns-proxy-upstream.  No fallback to
# KUBE_DNS_UPSTREAM_SERVICE_HOST: that is NodeLocal DNSCache's Service, deleted with it.
UPSTREAM_SERVICE_ENV = "KUBE_DNS_PROXY_UPSTREAM_SERVICE_HOST"


def _fill_upstream_placeholder(text: str, environ: Mapping[str, str]) -> str:
    """The manifest's placeholder becomes the kube-dns-proxy-upstream Service IP the kubelet gives the pod."""
    if text.strip() != UPSTREAM_PLACEHOLDER:
        return text
    host = environ.get(UPSTREAM_SERVICE_ENV, "").strip()
    if not host:
        raise ConfigError(
            f"--upstream {UPSTREAM_PLACEHOLDER} needs ${UPSTREAM_SERVICE_ENV} (the kube-dns-proxy-upstream Service)"
        )
    return f"[{host}]:53" if ":" in host else f"{host}:53"


def _split_items(flag: _Flag, raw: str) -> list[str]:
    """The items of a repeatable flag given as one string (environment variable or file scalar)."""
    items = raw.split(flag.env_separator) if flag.env_separator else raw.replace(" ", ",").split(",")
    return [item for item in items if item.strip()]


def _read_config_file(path: str) -> dict[str, object]:
    """The settings of a --config YAML file by Config field, as YAML typed them (not yet converted)."""
    # Imported here: PyYAML costs every proxy about 2.5 MB of memory, and most run without a file.
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{where}") from None
    if data is None:
        return {}  # an empty file: no settings
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must be a mapping of setting: value")
    by_name = {flag.option[2:].replace("-", "_"): flag for flag in FLAGS}
    by_name.update({flag.field: flag for flag in FLAGS})
    settings: dict[str, object] = {}
    for key, value in data.items():
        flag = by_name.get(str(key).strip().lower().replace("-", "_"))
        if flag is None or flag.field == "config":
            raise ConfigError(f"--config {path}: unknown setting {str(key)!r}")
        settings[flag.field] = value
    return settings


def _file_value(flag: _Flag, value: object, source: str, environ: Mapping[str, str]) -> object:
    """One setting of the --config file converted as its flag would be; YAML lists for repeatable flags."""
    if flag.parse is None:
        return value if isinstance(value, bool) else _truthy(str(value), source)
    if value is None:
        raise ConfigError(f"{source}: a value is needed")
    if flag.repeatable:
        if isinstance(value, dict):
            items = [f"{k}={'' if v is None else v}" for k, v in value.items()]  # forward: {zone: "servers options"}
        elif isinstance(value, list):
            items = [str(item) for item in value]
        else:
            items = _split_items(flag, str(value))
        if flag.field == "upstreams":
            items = [_fill_upstream_placeholder(item, environ) for item in items]
        return [_convert(flag, item, source) for item in items]
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{source}: expected one value, not a list")
    return _convert(flag, str(value), source)


def build_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """Build and validate the Config from flags, then the --config file, then environment variables."""
    environ = os.environ if environ is None else environ
    parsed = vars(_build_parser().parse_args(list(argv)))
    config_path = parsed["config"] or environ.get(ENV_PREFIX + "CONFIG") or None
    from_file = _read_config_file(config_path) if config_path else {}
    if parsed["upstreams"]:
        parsed["upstreams"] = [_fill_upstream_placeholder(u, environ) for u in parsed["upstreams"]]
    elif (
        parsed["upstreams"] is None
        and "upstreams" not in from_file
        and UPSTREAM_PLACEHOLDER in environ.get(ENV_PREFIX + "UPSTREAM", "")
    ):
        env_upstreams = environ[ENV_PREFIX + "UPSTREAM"].replace(" ", ",").split(",")
        parsed["upstreams"] = [_fill_upstream_placeholder(u, environ) for u in env_upstreams if u]
    # Field name -> value, typed per flag by the FLAGS table at run time; _validate checks the result.
    values: dict[str, Any] = {}
    for flag in FLAGS:
        value = parsed[flag.field]
        if value is None and flag.field in from_file:
            value = _file_value(flag, from_file[flag.field], f"--config {config_path}: {flag.option[2:]}", environ)
        elif value is None and flag.env in environ:
            raw = environ[flag.env]
            if flag.parse is None:
                value = _truthy(raw, flag.env)
            elif flag.repeatable:
                value = [_convert(flag, item, flag.env) for item in _split_items(flag, raw)]
            else:
                value = _convert(flag, raw, flag.env)
        elif value is not None and flag.parse is not None:
            if flag.repeatable:
                value = [_convert(flag, item, flag.option) for item in value]
            else:
                value = _convert(flag, value, flag.option)
        if value is not None:
            values[flag.field] = tuple(value) if flag.repeatable else value
    config = dataclasses.replace(Config(), **values)
    return _validate(config)


def _validate(config: Config) -> Config:
    if not config.listen:
        raise ConfigError("--listen: at least one address is needed")
    if config.min_ttl > config.max_ttl:
        raise ConfigError("--min-ttl must not exceed --max-ttl")
    if config.upstream_timeout > config.deadline:
        raise ConfigError("--upstream-timeout must not exceed --deadline")
    if config.intercept != "none" and not config.local_ips:
        raise ConfigError(f"--intercept {config.intercept} needs --local-ip")
    if config.cluster_domain == ".":
        raise ConfigError("--cluster-domain must be a domain name such as cluster.local")
    if config.search is None:
        config = dataclasses.replace(config, search=read_resolv_conf_search(config.resolv_conf))
    else:
        config = dataclasses.replace(config, search=tuple(domain for domain in config.search if domain))
    upstreams = config.upstreams
    if upstreams:
        for upstream in upstreams:
            if upstream.host in config.local_ips:
                raise ConfigError(f"--upstream {upstream} is one of our --local-ip addresses (forwarding loop)")
            if _is_own_listen_address(upstream, config.listen):
                raise ConfigError(f"--upstream {upstream} is one of our own --listen addresses (forwarding loop)")
        _validate_forward(config)
    else:
        found = read_resolv_conf_nameservers(config.resolv_conf)
        upstreams = tuple(u for u in found if not _is_own_listen_address(u, config.listen))
        if not upstreams:
            raise ConfigError(f"no --upstream given and no usable nameserver in {config.resolv_conf}")
        config = dataclasses.replace(config, upstreams=upstreams)
        _validate_forward(config)
    return config


def _validate_forward(config: Config) -> None:
    zones: set[str] = set()
    for route in config.forward:
        if route.zone in zones:
            raise ConfigError(f"--forward {route.zone}: zone given twice")
        zones.add(route.zone)
        for upstream in route.upstreams:
            if upstream.host in config.local_ips or _is_own_listen_address(upstream, config.listen):
                raise ConfigError(f"--forward {route.zone}: {upstream} is one of our own addresses (forwarding loop)")
        min_ttl = config.min_ttl if route.min_ttl is None else route.min_ttl
        max_ttl = config.max_ttl if route.max_ttl is None else route.max_ttl
        if min_ttl > max_ttl:
            raise ConfigError(f"--forward {route.zone}: min_ttl must not exceed max_ttl")


def main_config(argv: Sequence[str] | None = None) -> Config:
    """Build the Config for the entry point: a bad setting prints one line and exits with code 2."""
    try:
        return build_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"proxy.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def describe(config: Config) -> dict[str, object]:
    """The effective configuration as plain JSON-friendly values, for the start log line."""
    out: dict[str, object] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, tuple):
            value = [str(v) for v in value]
        elif isinstance(value, Endpoint):
            value = str(value)
        elif value == math.inf:
            value = "unlimited"
        out[field.name] = value
    return out
