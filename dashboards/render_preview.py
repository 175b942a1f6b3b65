"""Render docs/dashboard.png: drive a real proxy through a scripted scenario, draw the Grafana panels from /metrics.

Grafana is not installable on the development machines, so this script plays both Prometheus and
Grafana in a small way, from real data only:

1. starts a FakeUpstream (tests/servers.py) and proxy.py on 127.0.0.1, nothing else;
2. sends a bounded, paced query mix (hot Kubernetes names, search-path NXDOMAINs, unique names
   that fill the cache, bursts of identical queries, a few malformed packets) while the upstream
   is switched: answering, slow (0.3 s) for 10 s, down for 40 s (stale answers, RFC 8767), back;
3. scrapes /metrics every 2 s into memory and labels each sample with `instance` and `job` as
   Prometheus would;
4. evaluates the `expr` of every target of dashboards/kube-dns-proxy.json with a small PromQL
   subset (selectors, rate, sum/max/min/avg/count by, histogram_quantile, + - * /, comparisons)
   at each scrape time, and draws the panels at their gridPos in Grafana's dark theme.

Usage: python dashboards/render_preview.py [--out docs/dashboard.png] [--quick] [--save-samples F | --from-samples F]
(--quick runs the scenario 4x faster, for trying changes; --save-samples/--from-samples redraw
without rerunning it.) Needs matplotlib, which is not in requirements-dev.txt: pip install matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dnslib  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from servers import FakeUpstream, free_port  # noqa: E402

DASHBOARD = REPO_ROOT / "dashboards" / "kube-dns-proxy.json"
SCRAPE_INTERVAL = 2.0
# Grafana's $__rate_interval is at least 4 scrape intervals; 5 keeps rates smooth at 2 s scrapes.
RATE_WINDOW = 5 * SCRAPE_INTERVAL
LOOKBACK = 300.0  # seconds an instant selector looks back, as Prometheus' default lookback delta
QUERY_RATE = 300.0  # queries per second sent to the proxy
CACHE_SIZE = 600
CLUSTER_SUFFIX = ".svc.cluster.local."
SERVICES = 40
# The names kube-dns knows: svc-N.default.svc.cluster.local. and the SRV of its http port.
SERVICE_NAME = re.compile(r"(_http\._tcp\.)?svc-\d+\.default\.svc\.cluster\.local\.")

# (seconds from start, upstream mode) at normal speed; the scenario ends at SCENARIO_END.
PHASES = ((0.0, "answer"), (40.0, "slow"), (50.0, "answer"), (70.0, "down"), (110.0, "answer"))
SCENARIO_END = 150.0

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]


# --- The upstream: kube-dns as seen from a pod with ndots:5 ----------------------------------


class ClusterUpstream(FakeUpstream):
    """FakeUpstream that answers NXDOMAIN for unknown names under svc.cluster.local, as kube-dns does.

    A pod's resolver with `ndots:5` first tries every search domain, so "api.github.com" is asked as
    "api.github.com.default.svc.cluster.local." and friends, all NXDOMAIN (RFC 8020): most of the
    negative answers a node cache sees.
    """

    def __init__(self) -> None:
        records = {}
        for index in range(SERVICES):
            service = f"svc-{index}.default{CLUSTER_SUFFIX}"
            records[(f"_http._tcp.{service}", "SRV")] = [("SRV", f"0 100 80 {service}", 15)]
            records[(f"{index}.0.96.10.in-addr.arpa.", "PTR")] = [("PTR", service, 15)]
        super().__init__(ttl=15, neg_ttl=5, delay=0.3, records=records)

    def _reply(self, query: dnslib.DNSRecord, mode: str, transport: str) -> bytes | None:
        qname = str(query.q.qname).lower()
        if mode == "answer" and qname.endswith(".cluster.local.") and not SERVICE_NAME.fullmatch(qname):
            mode = "nxdomain"
        return super()._reply(query, mode, transport)


# --- Load: a paced, open-loop query mix ---------------------------------------------------


def query_mix(rng: random.Random, unique: Iterator[int]) -> tuple[str, int]:
    """Return one (qname, qtype) of the mix: mostly cache hits, some NXDOMAIN, a few new names."""
    roll = rng.random()
    service = f"svc-{rng.randrange(SERVICES)}.default{CLUSTER_SUFFIX}"
    if roll < 0.55:
        return service, dnslib.QTYPE.A
    if roll < 0.70:
        return service, dnslib.QTYPE.AAAA  # NODATA in an IPv4-only cluster
    if roll < 0.73:
        return f"_http._tcp.{service}", dnslib.QTYPE.SRV
    if roll < 0.75:
        return f"{rng.randrange(SERVICES)}.0.96.10.in-addr.arpa.", dnslib.QTYPE.PTR
    external = ("api.github.com", "registry.k8s.io", "s3.amazonaws.com", "pypi.org", "example.com")[rng.randrange(5)]
    if roll < 0.89:
        search = ("default.svc.cluster.local.", "svc.cluster.local.", "cluster.local.")[rng.randrange(3)]
        return f"{external}.{search}", dnslib.QTYPE.A  # NXDOMAIN from the search path
    if roll < 0.96:
        return f"{external}.", dnslib.QTYPE.A
    return f"u{next(unique)}.tenant.example.", dnslib.QTYPE.A  # never asked before: a miss


def send_load(address: tuple[str, int], duration: float, stop: threading.Event) -> int:
    """Send the query mix at QUERY_RATE for at most duration seconds; return how many were sent.

    Open loop: replies are read and discarded without waiting, so an upstream outage does not slow
    the clients down, as pods keep asking. Every 3 s a burst of 8 identical new queries arrives at
    once (a deployment scaling up), every 2 s one malformed datagram.
    """
    rng = random.Random(53)
    unique = iter(range(10**9))
    limit = int(QUERY_RATE * duration * 1.1) + 100  # bound on count as well as time
    sent = 0
    tick = 0.01
    start = time.monotonic()
    next_burst, next_garbage = start + 3.0, start + 2.0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        while not stop.is_set() and sent < limit:
            now = time.monotonic()
            if now - start >= duration:
                break
            due = int((now - start) * QUERY_RATE) - sent
            batch = [query_mix(rng, unique) for _ in range(max(0, min(due, 50)))]
            if now >= next_burst:
                burst_name = f"scale-{int(now * 1000)}.tenant.example."
                batch += [(burst_name, dnslib.QTYPE.A)] * 8
                next_burst += 3.0
            for qname, qtype in batch:
                packet = dnslib.DNSRecord.question(qname, dnslib.QTYPE.get(qtype)).pack()
                try:
                    sock.sendto(packet, address)
                except BlockingIOError:
                    continue
                sent += 1
            if now >= next_garbage:
                sock.sendto(b"\x00\x01", address)  # too short for a header: dropped as malformed
                next_garbage += 2.0
            try:
                while True:
                    sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                pass
            time.sleep(tick)
    return sent


def send_tcp_load(address: tuple[str, int], duration: float, stop: threading.Event) -> int:
    """Ask one hot name over TCP 4 times a second (clients retrying truncated answers); return the count."""
    sent = 0
    start = time.monotonic()
    while not stop.is_set() and sent < duration * 4 + 10 and time.monotonic() - start < duration:
        qname = f"svc-{sent % SERVICES}.default{CLUSTER_SUFFIX}"
        with contextlib.suppress(dns.exception.DNSException, OSError):
            dns.query.tcp(dns.message.make_query(qname, "A"), address[0], port=address[1], timeout=2)
        sent += 1
        stop.wait(0.25)
    return sent


# --- Scraping ------------------------------------------------------------------------------


class Store:
    """Scraped samples by series (labels including __name__), as Prometheus' TSDB would hold them."""

    def __init__(self) -> None:
        self.series: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        self.times: list[float] = []
        self.scenario = ""  # what produced the samples, for the footer

    def dump(self, path: Path) -> None:
        series = [[sorted(labels), points] for labels, points in self.series.items()]
        path.write_text(json.dumps({"scenario": self.scenario, "times": self.times, "series": series}))

    @classmethod
    def load(cls, path: Path) -> Store:
        data = json.loads(path.read_text())
        store = cls()
        store.times = data["times"]
        store.scenario = data["scenario"]
        for labels, points in data["series"]:
            store.series[frozenset(tuple(pair) for pair in labels)] = [tuple(point) for point in points]
        return store

    def add_scrape(self, timestamp: float, text: str, target_labels: dict[str, str]) -> None:
        self.times.append(timestamp)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {**sample.labels, **target_labels, "__name__": sample.name}
                self.series[frozenset(labels.items())].append((timestamp, float(sample.value)))


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


# --- A small PromQL subset -----------------------------------------------------------------


class Selector(NamedTuple):
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)
    range_seconds: float | None


class Call(NamedTuple):
    function: str
    args: tuple[Any, ...]


class Aggregation(NamedTuple):
    op: str
    by: tuple[str, ...]
    expr: Any


class Binary(NamedTuple):
    op: str
    left: Any
    right: Any


TOKEN = re.compile(
    r"""\s*(?:(?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<string>"(?:[^"\\]|\\.)*")|(?P<op>==|!=|=~|!~|>=|<=|[-+*/(){}\[\],=<>]))""",
    re.VERBOSE,
)
PRECEDENCE = {"==": 1, "!=": 1, ">": 1, "<": 1, ">=": 1, "<=": 1, "+": 2, "-": 2, "*": 3, "/": 3}
AGGREGATIONS = {"sum", "max", "min", "avg", "count"}
FUNCTIONS = {"rate", "histogram_quantile"}
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


class PromQLError(ValueError):
    """An expression outside the subset this script evaluates."""


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise PromQLError(f"cannot tokenize at {text[pos:]!r}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class Parser:
    """Recursive descent over the tokens; binary operators by precedence climbing."""

    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.pos = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def take(self, expected: str | None = None) -> str:
        kind, text = self.peek()
        if kind == "end" or (expected is not None and text != expected):
            raise PromQLError(f"expected {expected or 'a token'}, found {text or 'the end'}")
        self.pos += 1
        return text

    def parse(self) -> Any:
        node = self.expression(1)
        if self.peek()[0] != "end":
            raise PromQLError(f"unexpected {self.peek()[1]!r}")
        return node

    def expression(self, min_precedence: int) -> Any:
        left = self.operand()
        while True:
            kind, text = self.peek()
            if kind != "op" or PRECEDENCE.get(text, 0) < min_precedence:
                return left
            self.take()
            left = Binary(text, left, self.expression(PRECEDENCE[text] + 1))

    def operand(self) -> Any:
        kind, text = self.peek()
        if text == "(":
            self.take()
            node = self.expression(1)
            self.take(")")
            return node
        if kind == "number":
            return float(self.take())
        if kind != "ident":
            raise PromQLError(f"unexpected {text!r}")
        if text in AGGREGATIONS:
            return self.aggregation()
        if text in FUNCTIONS:
            self.take()
            self.take("(")
            args = [self.expression(1)]
            while self.peek()[1] == ",":
                self.take()
                args.append(self.expression(1))
            self.take(")")
            return Call(text, tuple(args))
        return self.selector()

    def label_list(self) -> tuple[str, ...]:
        self.take("(")
        labels = [self.take()]
        while self.peek()[1] == ",":
            self.take()
            labels.append(self.take())
        self.take(")")
        return tuple(labels)

    def aggregation(self) -> Aggregation:
        op = self.take()
        by: tuple[str, ...] = ()
        if self.peek()[1] == "by":
            self.take()
            by = self.label_list()
        self.take("(")
        inner = self.expression(1)
        self.take(")")
        if self.peek()[1] == "by":
            self.take()
            by = self.label_list()
        return Aggregation(op, by, inner)

    def selector(self) -> Selector:
        name = self.take()
        matchers = []
        if self.peek()[1] == "{":
            self.take()
            while self.peek()[1] != "}":
                label, op, value = self.take(), self.take(), self.take()
                matchers.append((label, op, json.loads(value)))
                if self.peek()[1] == ",":
                    self.take()
            self.take("}")
        range_seconds = None
        if self.peek()[1] == "[":
            self.take()
            amount, unit = float(self.take()), self.take()
            self.take("]")
            range_seconds = amount * UNIT_SECONDS[unit]
        return Selector(name, tuple(matchers), range_seconds)


def matches(labels: dict[str, str], selector: Selector) -> bool:
    if labels.get("__name__") != selector.name:
        return False
    for label, op, value in selector.matchers:
        actual = labels.get(label, "")
        if op == "=" and actual != value or op == "!=" and actual == value:
            return False
        # PromQL regex matchers are anchored at both ends.
        if op == "=~" and not re.fullmatch(value, actual) or op == "!~" and re.fullmatch(value, actual):
            return False
    return True


def window(points: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    return [(t, v) for t, v in points if start < t <= end]


def counter_rate(points: list[tuple[float, float]]) -> float | None:
    """Per-second increase over the points, a drop counted as a counter reset (no edge extrapolation)."""
    if len(points) < 2:
        return None
    increase = 0.0
    for (_, before), (_, after) in zip(points, points[1:], strict=False):
        increase += after if after < before else after - before
    return increase / (points[-1][0] - points[0][0])


def without(labels: Labels, names: set[str]) -> Labels:
    return frozenset((k, v) for k, v in labels if k not in names)


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile for one histogram: linear interpolation inside the bucket."""
    buckets.sort()
    if not buckets or not math.isinf(buckets[-1][0]):
        return math.nan
    cumulative, running = [], 0.0
    for bound, count in buckets:
        running = max(running, count)  # rates of cumulative buckets can jitter; keep them monotonic
        cumulative.append((bound, running))
    total = cumulative[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    index = next(i for i, (_, count) in enumerate(cumulative) if count >= rank)
    if index == len(cumulative) - 1:
        return cumulative[-2][0] if len(cumulative) > 1 else math.nan
    lower, below = (0.0, 0.0) if index == 0 else cumulative[index - 1]
    upper, count = cumulative[index]
    return lower + (upper - lower) * (rank - below) / (count - below)


def apply(op: str, left: float, right: float) -> float | None:
    """Arithmetic gives a value; a comparison keeps the left value or drops the sample (None)."""
    if op in ("+", "-", "*"):
        return left + right if op == "+" else left - right if op == "-" else left * right
    if op == "/":
        if right == 0:
            return math.nan if left == 0 or math.isnan(left) else math.copysign(math.inf, left)
        return left / right
    keep = {
        "==": left == right,
        "!=": left != right,
        ">": left > right,
        "<": left < right,
        ">=": left >= right,
        "<=": left <= right,
    }[op]
    return left if keep else None


def evaluate(node: Any, store: Store, at: float) -> Vector | float:
    """Evaluate a parsed expression at one timestamp: a scalar or an instant vector."""
    if isinstance(node, float):
        return node
    if isinstance(node, Selector):
        if node.range_seconds is not None:
            raise PromQLError("a range selector needs rate()")
        out: Vector = {}
        for labels, points in store.series.items():
            if matches(dict(labels), node):
                recent = window(points, at - LOOKBACK, at)
                if recent:
                    out[labels] = recent[-1][1]
        return out
    if isinstance(node, Call) and node.function == "rate":
        (inner,) = node.args
        if not isinstance(inner, Selector) or inner.range_seconds is None:
            raise PromQLError("rate() takes a range selector")
        out = {}
        for labels, points in store.series.items():
            if matches(dict(labels), inner):
                value = counter_rate(window(points, at - inner.range_seconds, at))
                if value is not None:
                    out[without(labels, {"__name__"})] = value
        return out
    if isinstance(node, Call) and node.function == "histogram_quantile":
        q = evaluate(node.args[0], store, at)
        buckets = evaluate(node.args[1], store, at)
        if not isinstance(q, float) or isinstance(buckets, float):
            raise PromQLError("histogram_quantile(scalar, vector)")
        groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        for labels, value in buckets.items():
            le = dict(labels).get("le")
            if le is not None:
                groups[without(labels, {"le", "__name__"})].append((float(le), value))
        return {labels: bucket_quantile(q, points) for labels, points in groups.items()}
    if isinstance(node, Aggregation):
        inner_vector = evaluate(node.expr, store, at)
        if isinstance(inner_vector, float):
            raise PromQLError(f"{node.op}() takes a vector")
        grouped: dict[Labels, list[float]] = defaultdict(list)
        for labels, value in inner_vector.items():
            grouped[frozenset((k, v) for k, v in labels if k in node.by)].append(value)
        reduce = {"sum": sum, "max": max, "min": min, "count": len, "avg": lambda values: sum(values) / len(values)}
        return {labels: float(reduce[node.op](values)) for labels, values in grouped.items()}
    if isinstance(node, Binary):
        left, right = evaluate(node.left, store, at), evaluate(node.right, store, at)
        if isinstance(left, float) and isinstance(right, float):
            value = apply(node.op, left, right)
            return math.nan if value is None else value
        if isinstance(right, float):
            pairs = [(labels, value, right) for labels, value in left.items()]  # type: ignore[union-attr]
        elif isinstance(left, float):
            pairs = [(labels, left, value) for labels, value in right.items()]
        else:
            # One-to-one matching on identical label sets (no on()/ignoring() in this subset).
            stripped = {without(labels, {"__name__"}): value for labels, value in right.items()}
            pairs = [
                (without(labels, {"__name__"}), value, stripped[without(labels, {"__name__"})])
                for labels, value in left.items()
                if without(labels, {"__name__"}) in stripped
            ]
        out = {}
        for labels, a, b in pairs:
            result = apply(node.op, a, b)
            if result is not None:
                out[labels] = result
        return out
    raise PromQLError(f"cannot evaluate {node!r}")


def substitute(expr: str, instance_regex: str) -> str:
    """Replace Grafana's variables as Grafana would before sending the query."""
    return expr.replace("$__rate_interval", f"{int(RATE_WINDOW)}s").replace("$instance", instance_regex)


def legend_name(legend_format: str, labels: Labels) -> str:
    plain = dict(without(labels, {"__name__"}))
    if not legend_format:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(plain.items())) + "}" if plain else "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: plain.get(m.group(1), ""), legend_format).strip()


class Series(NamedTuple):
    name: str
    values: list[float]


def panel_series(panel: dict[str, Any], store: Store, instance_regex: str) -> list[Series]:
    """Evaluate every target of a panel at every scrape time, one Series per resulting label set."""
    series: list[Series] = []
    for target in panel["targets"]:
        parsed = Parser(substitute(target["expr"], instance_regex)).parse()
        by_labels: dict[Labels, list[float]] = {}
        for index, at in enumerate(store.times):
            result = evaluate(parsed, store, at)
            vector = {frozenset(): result} if isinstance(result, float) else result
            for labels, value in vector.items():
                by_labels.setdefault(labels, [math.nan] * len(store.times))[index] = value
        for labels, values in sorted(by_labels.items(), key=lambda item: sorted(item[0])):
            series.append(Series(legend_name(target.get("legendFormat", ""), labels), values))
    return series


# --- Drawing in Grafana's dark theme -------------------------------------------------------

BACKGROUND = "#111217"
PANEL = "#181b1f"
BORDER = "#2a2d33"
TEXT = "#ccccdc"
TEXT_DIM = "#8e8e9a"
GRID = "#25282d"
# Grafana's "palette-classic" order.
PALETTE = (
    "#73BF69",
    "#F2CC0C",
    "#8AB8FF",
    "#FF780A",
    "#F2495C",
    "#5794F2",
    "#B877D9",
    "#705DA0",
    "#37872D",
    "#FADE2A",
    "#447EBC",
    "#C15C17",
    "#890F02",
    "#0A437C",
    "#6D1F62",
    "#584477",
)
FIG_WIDTH = 1400  # pixels; the README shows it at about 1000
UNIT_HEIGHT = 36  # pixels per Grafana grid row (Grafana: 30 + margins)
GAP = 8
HEADER = 64
FOOTER = 46


def format_value(value: float, unit: str, decimals: int | None = None) -> str:
    """Format a value as Grafana does for the units this dashboard uses."""
    if math.isnan(value):
        return "No data"
    if unit == "percentunit":
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "s":
        if value == 0:
            return "0 s"
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(value) >= scale or suffix == "µs":
                return f"{value / scale:.3g} {suffix}"
    suffix = {"reqps": " req/s", "ops": " ops/s", "pps": " p/s"}.get(unit, "")
    if abs(value) >= 1000:
        return f"{value / 1000:.3g}K{suffix}"
    if decimals is not None:
        return f"{value:.{decimals}f}{suffix}"
    return f"{value:.3g}{suffix}"


def override_properties(panel: dict[str, Any], name: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for override in panel["fieldConfig"].get("overrides", []):
        matcher = override["matcher"]
        if (matcher["id"] == "byName" and matcher["options"] == name) or (
            matcher["id"] == "byRegexp" and re.fullmatch(matcher["options"], name)
        ):
            for prop in override["properties"]:
                properties[prop["id"]] = prop["value"]
    return properties


def threshold_color(panel: dict[str, Any], value: float) -> str:
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    color = steps[0]["color"]
    for step in steps[1:]:
        if not math.isnan(value) and value >= step["value"]:
            color = step["color"]
    return color


def to_figure(fig: Any, x: float, y: float, w: float, h: float) -> list[float]:
    """Pixel box (from the top left) to figure fractions (from the bottom left)."""
    width, height = fig.get_size_inches() * fig.dpi
    return [x / width, 1 - (y + h) / height, w / width, h / height]


def grid_box(panel: dict[str, Any]) -> tuple[float, float, float, float]:
    pos = panel["gridPos"]
    column = (FIG_WIDTH - GAP) / 24
    x = GAP + pos["x"] * column
    y = HEADER + pos["y"] * UNIT_HEIGHT
    return x, y, pos["w"] * column - GAP, pos["h"] * UNIT_HEIGHT - GAP


def draw_frame(fig: Any, panel: dict[str, Any]) -> tuple[float, float, float, float]:
    from matplotlib.patches import FancyBboxPatch

    x, y, w, h = grid_box(panel)
    frame = fig.add_axes(to_figure(fig, x, y, w, h))
    frame.set_axis_off()
    frame.add_patch(
        FancyBboxPatch(
            (0, 0),
            1,
            1,
            boxstyle="round,pad=0,rounding_size=0.012",
            transform=frame.transAxes,
            facecolor=PANEL,
            edgecolor=BORDER,
            linewidth=1.0,
            mutation_aspect=w / h,
        )
    )
    fig.text(
        *to_figure(fig, x + 12, y + 8, 0, 16)[:2],
        panel["title"],
        color=TEXT,
        fontsize=12.5,
        fontweight="bold",
        va="bottom",
    )
    return x, y, w, h


def style_time_axis(ax: Any, times: list[datetime], width: float) -> None:
    import matplotlib.dates as mdates

    ax.set_facecolor("none")
    ax.set_xlim(times[0], times[-1])
    # About one time label per 80 pixels, as Grafana thins its axis.
    seconds = (times[-1] - times[0]).total_seconds()
    every = next((s for s in (15, 30, 60, 120, 300, 600) if seconds / s <= width / 80), 900)
    if every < 60:
        ax.xaxis.set_major_locator(mdates.SecondLocator(bysecond=range(0, 60, every)))
    else:
        ax.xaxis.set_major_locator(mdates.MinuteLocator(byminute=range(0, 60, every // 60)))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if every < 60 else "%H:%M"))
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.grid(True, color=GRID, linewidth=0.9)
    ax.tick_params(colors=TEXT_DIM, labelsize=10.5, length=0, pad=4)


def draw_regions(ax: Any, times: list[datetime], regions: list[tuple[int, int]]) -> None:
    for start, end in regions:
        ax.axvspan(times[start], times[end], color="#F2495C", alpha=0.10, linewidth=0, zorder=0)


LEGEND_ROW = 20  # pixels per legend line


def layout_legend(fig: Any, names: list[str], width: float) -> list[tuple[int, float, Any]]:
    """Place legend entries left to right, wrapping at the panel width as Grafana's list legend does.

    Returns (row, x offset, text artist) per name; the artists are created now (to be measured)
    and moved into place by draw_legend().
    """
    renderer = fig.canvas.get_renderer()
    placed, row, cursor = [], 0, 0.0
    for name in names:
        text = fig.text(0, 0, name, color=TEXT, fontsize=10.5, va="center")
        entry = 20 + text.get_window_extent(renderer).width + 16  # swatch, label, spacing
        if cursor and cursor + entry > width:
            row, cursor = row + 1, 0.0
        placed.append((row, cursor, text))
        cursor += entry
    return placed


def draw_legend(fig: Any, legend: list[tuple[int, float, Any]], colors: list[str], x: float, y: float) -> None:
    from matplotlib.patches import Rectangle

    for (row, offset, text), color in zip(legend, colors, strict=True):
        middle = y + row * LEGEND_ROW + LEGEND_ROW / 2
        left, bottom, _, _ = to_figure(fig, x + offset, middle + 2, 0, 0)
        _, _, swatch_w, swatch_h = to_figure(fig, 0, 0, 14, 4)
        fig.add_artist(Rectangle((left, bottom), swatch_w, swatch_h, transform=fig.transFigure, color=color))
        text.set_position(to_figure(fig, x + offset + 20, middle, 0, 0)[:2])


def draw_timeseries(
    fig: Any, panel: dict[str, Any], series: list[Series], times: list[datetime], regions: list[tuple[int, int]]
) -> None:
    import matplotlib.ticker as mticker
    import numpy as np

    x, y, w, h = draw_frame(fig, panel)
    defaults = panel["fieldConfig"]["defaults"]
    custom = defaults.get("custom", {})
    unit = defaults.get("unit", "short")
    legend = layout_legend(fig, [s.name for s in series], w - 24)
    legend_height = LEGEND_ROW * (max((row for row, _, _ in legend), default=0) + 1) + 4
    ax = fig.add_axes(to_figure(fig, x + 74, y + 36, w - 90, h - 36 - 26 - legend_height))
    style_time_axis(ax, times, w - 90)
    draw_regions(ax, times, regions)
    base = np.zeros(len(times))
    top = 0.0
    colors: list[str] = []
    for index, item in enumerate(series):
        props = override_properties(panel, item.name)
        color = props.get("color", {}).get("fixedColor", PALETTE[index % len(PALETTE)])
        stacked = props.get("custom.stacking", custom.get("stacking", {})).get("mode") == "normal"
        values = np.array(item.values, dtype=float)
        if stacked:
            values = base + np.nan_to_num(values)
        dash = props.get("custom.lineStyle", {}).get("dash")
        step = "post" if custom.get("lineInterpolation") == "stepAfter" else None
        ax.plot(
            times,
            values,
            color=color,
            linewidth=1.6,
            drawstyle="steps-post" if step else "default",
            dashes=dash or (None, None),
            zorder=4 if dash else 3,
        )
        fill = props.get("custom.fillOpacity", custom.get("fillOpacity", 0)) / 100
        if fill:
            lower = base if stacked else np.zeros(len(times))
            ax.fill_between(times, lower, values, color=color, alpha=fill * 1.6, linewidth=0, step=step, zorder=2)
        if stacked:
            base = values
        if not np.all(np.isnan(values)):
            top = max(top, float(np.nanmax(values)))
        colors.append(color)
    log = custom.get("scaleDistribution", {}).get("type") == "log"
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(defaults.get("min", 0), defaults.get("max", top * 1.12 if top > 0 else 1))
    decimals = defaults.get("decimals")
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda value, _: format_value(value, unit, decimals)))
    ax.yaxis.set_major_locator(mticker.MaxNLocator(4) if not log else mticker.LogLocator(numticks=5))
    if unit == "none" and defaults.get("max") == 1:
        ax.set_yticks([0, 1])
    if not series:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, color=TEXT_DIM, ha="center", va="center")
    draw_legend(fig, legend, colors, x + 12, y + h - legend_height - 2)


def draw_stat(fig: Any, panel: dict[str, Any], series: list[Series], times: list[datetime]) -> None:
    import numpy as np

    x, y, w, h = draw_frame(fig, panel)
    defaults = panel["fieldConfig"]["defaults"]
    values = np.array(series[0].values if series else [math.nan] * len(times), dtype=float)
    finite = values[~np.isnan(values)]
    last = float(finite[-1]) if len(finite) else math.nan  # reduceOptions: lastNotNull
    color = threshold_color(panel, last)
    spark = fig.add_axes(to_figure(fig, x + 1, y + h * 0.45, w - 2, h * 0.55 - 2))
    spark.set_axis_off()
    spark.set_facecolor("none")
    if len(finite):
        filled = np.where(np.isnan(values), np.nan, values)
        spark.plot(times, filled, color=color, linewidth=1.3, alpha=0.9)
        spark.fill_between(times, 0, np.nan_to_num(filled), color=color, alpha=0.16, linewidth=0)
        top = float(np.nanmax(values))
        spark.set_ylim(0, top * 1.25 if top > 0 else 1)
        spark.set_xlim(times[0], times[-1])
    text = format_value(last, defaults.get("unit", "short"), defaults.get("decimals"))
    fig.text(
        *to_figure(fig, x + w / 2, y + h * 0.62, 0, 0)[:2],
        text,
        color=color,
        fontsize=27,
        fontweight="bold",
        ha="center",
        va="center",
    )


def annotation_regions(dashboard: dict[str, Any], store: Store, instance_regex: str) -> list[tuple[int, int]]:
    """Index ranges where a Prometheus annotation query returns samples (Grafana draws them as regions)."""
    regions: list[tuple[int, int]] = []
    for annotation in dashboard["annotations"]["list"]:
        if "expr" not in annotation or not annotation.get("enable"):
            continue
        parsed = Parser(substitute(annotation["expr"], instance_regex)).parse()
        active = [bool(evaluate(parsed, store, at)) for at in store.times]
        start = None
        for index, on in enumerate([*active, False]):
            if on and start is None:
                start = index
            elif not on and start is not None:
                regions.append((start, min(index, len(active) - 1)))
                start = None
    return regions


def render(dashboard: dict[str, Any], store: Store, instance: str, out: Path, scenario: str) -> None:
    """Draw every panel of the dashboard from the store into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # All nodes selected: Grafana sends the variable's allValue.
    instance_regex = next(v for v in dashboard["templating"]["list"] if v["name"] == "instance")["allValue"]
    panels = dashboard["panels"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = HEADER + bottom * UNIT_HEIGHT + FOOTER
    fig = plt.figure(figsize=(FIG_WIDTH / 100, height / 100), dpi=100, facecolor=BACKGROUND)
    times = [datetime.fromtimestamp(t) for t in store.times]
    regions = annotation_regions(dashboard, store, instance_regex)

    fig.text(
        *to_figure(fig, GAP + 4, 18, 0, 0)[:2],
        f"Dashboards  /  {dashboard['title']}",
        color=TEXT,
        fontsize=17,
        fontweight="bold",
        va="center",
    )
    span = f"{times[0]:%Y-%m-%d %H:%M:%S} to {times[-1]:%H:%M:%S}"
    chips = [("Node (instance)", f"All ({instance})"), ("Time", span), ("Step", f"{SCRAPE_INTERVAL:g} s scrapes")]
    cursor = GAP + 4
    renderer = fig.canvas.get_renderer()
    for label, value in chips:
        for text, color, face in ((label, TEXT_DIM, "#22252b"), (value, TEXT, PANEL)):
            chip = fig.text(
                *to_figure(fig, cursor, 46, 0, 0)[:2],
                text,
                color=color,
                fontsize=10.5,
                va="center",
                bbox={"facecolor": face, "edgecolor": BORDER, "pad": 5},
            )
            cursor += chip.get_window_extent(renderer).width + 10
        cursor += 14
    if regions:
        fig.text(
            *to_figure(fig, FIG_WIDTH - GAP - 4, 46, 0, 0)[:2],
            "▮ annotation: upstream down",
            color="#F2495C",
            fontsize=10.5,
            ha="right",
            va="center",
        )

    for panel in panels:
        if panel["type"] == "row":
            x, y, _, _ = grid_box(panel)
            fig.text(
                *to_figure(fig, x + 2, y + 10, 0, 0)[:2],
                f"⌄  {panel['title']}",
                color=TEXT,
                fontsize=13,
                fontweight="bold",
                va="center",
            )
            continue
        series = panel_series(panel, store, instance_regex)
        if panel["type"] == "stat":
            draw_stat(fig, panel, series, times)
        else:
            draw_timeseries(fig, panel, series, times, regions)

    footer = (
        "rendered from real /metrics samples by dashboards/render_preview.py (panels of dashboards/kube-dns-proxy.json)"
        f"\nscenario: {scenario}"
    )
    fig.text(
        *to_figure(fig, GAP + 4, height - FOOTER / 2, 0, 0)[:2],
        footer,
        color=TEXT_DIM,
        fontsize=10,
        va="center",
        linespacing=1.5,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor=BACKGROUND)
    plt.close(fig)


# --- The scenario --------------------------------------------------------------------------


def start_proxy(listen_port: int, http_port: int, upstream: str, log_dir: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "proxy.py",
        "--listen",
        f"127.0.0.1:{listen_port}",
        "--upstream",
        upstream,
        "--http",
        f"127.0.0.1:{http_port}",
        "--cache-size",
        str(CACHE_SIZE),
        "--failure-recheck",
        "5",
        "--upstream-timeout",
        "1",
        "--log-level",
        "warning",
    ]
    # Flags from the caller's shell must not change the scenario.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE_DNS_PROXY_")}
    with (log_dir / "proxy.stdout").open("wb") as stdout, (log_dir / "proxy.stderr").open("wb") as stderr:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited: {(log_dir / 'proxy.stderr').read_text()[-2000:]}")
        try:
            scrape(f"http://127.0.0.1:{http_port}/metrics")
            return proc
        except OSError:
            time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError("proxy did not serve /metrics within 10 s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def switch_mode(upstream: FakeUpstream, mode: str) -> None:
    """Set the upstream's mode; retry (10 times, 0.5 s apart) when its port cannot be rebound yet.

    Leaving "down" rebinds the same port; while it was closed, the kernel may have handed that
    port to another socket on the machine as an ephemeral source port (EADDRINUSE until it closes).
    """
    for _ in range(10):
        try:
            upstream.mode = mode
            return
        except OSError as exc:
            print(f"upstream could not rebind its port ({exc}); retrying", file=sys.stderr)
            upstream.mode = "down"  # the failed switch left the mode set but the sockets closed
            time.sleep(0.5)
    raise RuntimeError(f"upstream could not switch to {mode}")


def run_scenario(speed: float) -> tuple[Store, str]:
    """Run the scripted scenario against a real proxy and return the scraped samples and the instance."""
    store = Store()
    duration = SCENARIO_END / speed
    with tempfile.TemporaryDirectory(prefix="render-preview-") as log_dir, ClusterUpstream() as up:
        listen_port, http_port = free_port(), free_port()
        proxy = start_proxy(listen_port, http_port, up.address, Path(log_dir))
        instance = f"127.0.0.1:{http_port}"
        target_labels = {"instance": instance, "job": "kube-dns-proxy"}
        stop = threading.Event()
        loads = [
            threading.Thread(target=send, args=(("127.0.0.1", listen_port), duration, stop), daemon=True)
            for send in (send_load, send_tcp_load)
        ]
        try:
            start = time.monotonic()
            for load in loads:
                load.start()
            phases = [(at / speed, mode) for at, mode in PHASES]
            next_scrape = start
            while (elapsed := time.monotonic() - start) < duration:
                while phases and phases[0][0] <= elapsed:
                    switch_mode(up, phases.pop(0)[1])
                    print(f"{elapsed:6.1f} s  upstream {up.mode}", file=sys.stderr)
                if time.monotonic() >= next_scrape:
                    store.add_scrape(time.time(), scrape(f"http://{instance}/metrics"), target_labels)
                    next_scrape += SCRAPE_INTERVAL
                time.sleep(0.05)
        finally:
            stop.set()
            for load in loads:
                load.join(timeout=10)
            stop_process(proxy)
    return store, instance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "dashboard.png")
    parser.add_argument("--quick", action="store_true", help="run the scenario 4x faster (for trying changes)")
    parser.add_argument("--save-samples", type=Path, help="also write the scraped samples to this JSON file")
    parser.add_argument("--from-samples", type=Path, help="redraw from samples saved by --save-samples, no scenario")
    args = parser.parse_args(argv)
    speed = 4.0 if args.quick else 1.0
    dashboard = json.loads(DASHBOARD.read_text())
    if args.from_samples:
        store = Store.load(args.from_samples)
        instance = next(v for labels in store.series for k, v in labels if k == "instance")
    else:
        store, instance = run_scenario(speed)
        store.scenario = (
            f"{QUERY_RATE:.0f} q/s UDP + 4 q/s TCP for {SCENARIO_END / speed:.0f} s; upstream slow (0.3 s) at "
            f"{PHASES[1][0] / speed:.0f}–{PHASES[2][0] / speed:.0f} s, down at {PHASES[3][0] / speed:.0f}–"
            f"{PHASES[4][0] / speed:.0f} s; --cache-size {CACHE_SIZE}"
        )
    if args.save_samples:
        store.dump(args.save_samples)
    render(dashboard, store, instance, args.out, store.scenario)
    print(f"wrote {args.out} from {len(store.times)} scrapes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
