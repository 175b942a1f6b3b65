"""Draw docs/dashboard.png from Prometheus query_range results of a scripted run (not a Grafana screenshot).

1. tests/promlab.py's ScriptedRun starts a kube-dns-like FakeUpstream, proxy.py and a real
   Prometheus (1 s scrapes, storage in a temporary directory), all on 127.0.0.1;
2. under a paced query mix the upstream answers, hangs, is closed, and answers again (bounded:
   about 90 s at the default --speed 4);
3. every target `expr` of dashboards/kube-dns-proxy.json, and its annotation, interpolated as
   Grafana does with every node selected, goes to Prometheus' /api/v1/query_range;
4. matplotlib draws the panels at their gridPos in the colours of Grafana's dark theme.

Usage: python dashboards/render_preview.py [--out docs/dashboard.png] [--speed 4]
                                           [--save-results F | --from-results F]
(--save-results/--from-results redraw without rerunning.) Needs matplotlib, which is not in
requirements-dev.txt (the tests do not draw): pip install matplotlib==3.11.2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from promlab import PHASES, SCRAPE_INTERVAL, ScriptedRun, grafana_interpolate  # noqa: E402

DASHBOARD = REPO_ROOT / "dashboards" / "kube-dns-proxy.json"
STEP = SCRAPE_INTERVAL  # Grafana's $__interval for a short range: the data source's scrape interval
LABEL = "rendered from Prometheus query_range of a scripted run, not a Grafana screenshot"

# Grafana's dark theme and its "palette-classic" order.
BACKGROUND, PANEL, BORDER, TEXT, TEXT_DIM, GRID = "#111217", "#181b1f", "#2a2d33", "#ccccdc", "#8e8e9a", "#25282d"
PALETTE = ("#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#705DA0", "#37872D")
WIDTH, ROW, GAP, HEADER, FOOTER = 1400, 36, 8, 64, 50  # pixels; ROW is one grid unit of height


# --- Querying ----------------------------------------------------------------------------


def legend(legend_format: str, labels: dict[str, str]) -> str:
    if not legend_format:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend_format).strip()


def query_results(run: ScriptedRun, dashboard: dict[str, Any]) -> dict[str, Any]:
    """query_range of every target and annotation, every node selected; values aligned on one time axis."""
    prometheus = run.prometheus
    assert prometheus is not None
    variables = {v["name"]: None for v in dashboard["templating"]["list"] if v["type"] == "query"}
    all_values = {v["name"]: v.get("allValue", ".*") for v in dashboard["templating"]["list"] if v["type"] == "query"}
    start, end = math.floor(run.start), math.ceil(run.end)
    times = [start + i * STEP for i in range(int((end - start) / STEP) + 1)]

    def series(expr: str, legend_format: str) -> list[tuple[str, list[float | None]]]:
        found = prometheus.query_range(grafana_interpolate(expr, variables, all_values, STEP), start, end, STEP)
        out = []
        for item in sorted(found, key=lambda s: sorted(s["metric"].items())):
            by_time = {round(t): float(v) for t, v in item["values"]}
            out.append((legend(legend_format, item["metric"]), [by_time.get(round(t)) for t in times]))
        return out

    panels = {}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            panels[str(panel["id"])] = [
                s for t in panel["targets"] for s in series(t["expr"], t.get("legendFormat", ""))
            ]
    annotations = [
        (a["titleFormat"], s[1]) for a in dashboard["annotations"]["list"] if "expr" in a for s in series(a["expr"], "")
    ]
    phases = ", ".join(f"{p.mode} {p.end - p.start:.0f} s" for p in run.phases)
    flags = " ".join(run.proxy_args()[2:])
    flags = re.sub(r"--(listen|upstream|http|log-level) \S+ ?", "", flags).strip()
    scenario = f"scenario: {run.rate:.0f} UDP + 4 TCP queries/s; upstream {phases}; proxy.py {flags}"
    return {"times": times, "panels": panels, "annotations": annotations, "scenario": scenario}


def prometheus_version() -> str:
    out = subprocess.run(["prometheus", "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"version (\S+)", out)
    return found.group(1) if found else "?"


# --- Drawing ---------------------------------------------------------------------------------


def format_value(value: float | None, unit: str, decimals: int | None = None) -> str:
    """A value as Grafana shows it in the units this dashboard uses."""
    if value is None or math.isnan(value):
        return "No data"
    if unit == "percentunit":
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "s":
        scale, suffix = next(((s, x) for s, x in ((1, "s"), (1e-3, "ms")) if abs(value) >= s), (1e-6, "µs"))
        return "0 s" if value == 0 else f"{value / scale:.3g} {suffix}"
    suffix = {"reqps": " req/s", "ops": " ops/s", "pps": " p/s"}.get(unit, "")
    if abs(value) >= 1000:
        return f"{value / 1000:.3g}K{suffix}"
    return f"{value:.{decimals}f}{suffix}" if decimals is not None else f"{value:.3g}{suffix}"


def overrides(panel: dict[str, Any], name: str) -> dict[str, Any]:
    """The field overrides of a series name (byName or byRegexp matchers)."""
    props: dict[str, Any] = {}
    for override in panel["fieldConfig"].get("overrides", []):
        kind, pattern = override["matcher"]["id"], override["matcher"]["options"]
        if (kind == "byName" and pattern == name) or (kind == "byRegexp" and re.fullmatch(pattern, name)):
            props.update({p["id"]: p["value"] for p in override["properties"]})
    return props


class Canvas:
    """A matplotlib figure addressed in Grafana's pixels from the top left."""

    def __init__(self, plt: Any, height: float) -> None:
        self.fig = plt.figure(figsize=(WIDTH / 100, height / 100), dpi=100, facecolor=BACKGROUND)
        self.height = height

    def box(self, x: float, y: float, w: float, h: float) -> list[float]:
        return [x / WIDTH, 1 - (y + h) / self.height, w / WIDTH, h / self.height]

    def text(self, x: float, y: float, text: str, **style: Any) -> None:
        self.fig.text(x / WIDTH, 1 - y / self.height, text, **{"color": TEXT, "va": "center", **style})

    def panel(self, panel: dict[str, Any]) -> tuple[float, float, float, float]:
        """Draw a panel's frame and title; return its pixel box."""
        from matplotlib.patches import FancyBboxPatch

        pos, column = panel["gridPos"], (WIDTH - GAP) / 24
        x, y, w, h = GAP + pos["x"] * column, HEADER + pos["y"] * ROW, pos["w"] * column - GAP, pos["h"] * ROW - GAP
        frame = self.fig.add_axes(self.box(x, y, w, h))
        frame.set_axis_off()
        frame.add_patch(
            FancyBboxPatch((0, 0), 1, 1, boxstyle="round,pad=0,rounding_size=0.012", transform=frame.transAxes,
                           facecolor=PANEL, edgecolor=BORDER, mutation_aspect=w / h)
        )  # fmt: skip
        self.text(x + 12, y + 16, panel["title"], fontsize=12.5, fontweight="bold")
        return x, y, w, h


def draw_stat(canvas: Canvas, panel: dict[str, Any], series: list[Any], times: list[datetime]) -> None:
    """The last value (reduceOptions lastNotNull) in its threshold colour over a sparkline."""
    x, y, w, h = canvas.panel(panel)
    defaults = panel["fieldConfig"]["defaults"]
    values = series[0][1] if series else []
    last = next((v for v in reversed(values) if v is not None and not math.isnan(v)), None)
    color = defaults["thresholds"]["steps"][0]["color"]
    for step in defaults["thresholds"]["steps"][1:]:
        if last is not None and last >= step["value"]:
            color = step["color"]
    spark = canvas.fig.add_axes(canvas.box(x + 1, y + h * 0.45, w - 2, h * 0.55 - 2))
    spark.set_axis_off()
    if values:
        spark.fill_between(times, [v or 0 for v in values], color=color, alpha=0.16, linewidth=0)
        spark.plot(times, [math.nan if v is None else v for v in values], color=color, linewidth=1.3)
        spark.set_xlim(times[0], times[-1])
        spark.set_ylim(bottom=0)
    unit, decimals = defaults.get("unit", "short"), defaults.get("decimals")
    canvas.text(x + w / 2, y + h * 0.6, format_value(last, unit, decimals), color=color, fontsize=26,
                fontweight="bold", ha="center")  # fmt: skip


def draw_timeseries(
    canvas: Canvas, panel: dict[str, Any], series: list[Any], times: list[datetime], regions: list[Any]
) -> None:
    """Lines (stacked where the panel stacks), annotation regions shaded, the legend below."""
    import matplotlib.dates as mdates
    import matplotlib.ticker as mticker
    import numpy as np

    x, y, w, h = canvas.panel(panel)
    defaults = panel["fieldConfig"]["defaults"]
    custom, unit = defaults.get("custom", {}), defaults.get("unit", "short")
    columns = max(1, int((w - 24) // 150))
    legend_height = 20 * math.ceil(max(len(series), 1) / columns) + 8
    ax = canvas.fig.add_axes(canvas.box(x + 70, y + 34, w - 84, h - 60 - legend_height))
    ax.set_facecolor("none")
    for start, end in regions:
        ax.axvspan(start, end, color="#F2495C", alpha=0.10, linewidth=0)
    base = np.zeros(len(times))
    for index, (name, raw) in enumerate(series):
        props = overrides(panel, name)
        color = props.get("color", {}).get("fixedColor", PALETTE[index % len(PALETTE)])
        values = np.array([math.nan if v is None else v for v in raw], dtype=float)
        stacked = props.get("custom.stacking", custom.get("stacking", {})).get("mode") == "normal"
        lower = base if stacked else np.zeros(len(times))
        if stacked:
            values = base + np.nan_to_num(values)
            base = values
        step = "post" if custom.get("lineInterpolation") == "stepAfter" else None
        dashes = props.get("custom.lineStyle", {}).get("dash") or (None, None)
        ax.plot(times, values, color=color, linewidth=1.5, drawstyle="steps-post" if step else "default",
                dashes=dashes, label=name)  # fmt: skip
        fill = props.get("custom.fillOpacity", custom.get("fillOpacity", 0)) / 100
        if fill:
            ax.fill_between(times, lower, values, color=color, alpha=fill * 1.6, linewidth=0, step=step)
    if custom.get("scaleDistribution", {}).get("type") == "log":
        ax.set_yscale("log")
    else:
        ax.set_ylim(defaults.get("min", 0), defaults.get("max"))
        ax.yaxis.set_major_locator(mticker.MaxNLocator(4, integer=defaults.get("decimals") == 0))
    ax.yaxis.set_major_formatter(
        mticker.FuncFormatter(lambda value, _: format_value(value, unit, defaults.get("decimals")))
    )
    ax.set_xlim(times[0], times[-1])
    # About one time label per 85 pixels, as Grafana thins its axis.
    seconds = (times[-1] - times[0]).total_seconds()
    every = next((s for s in (10, 15, 20, 30) if seconds / s <= (w - 84) / 85), 60)
    ax.xaxis.set_major_locator(mdates.SecondLocator(bysecond=range(0, 60, every)))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.grid(True, color=GRID, linewidth=0.9)
    ax.tick_params(colors=TEXT_DIM, labelsize=10, length=0, pad=4)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(-70 / (w - 84), -0.1), ncol=columns, frameon=False,
                  fontsize=10, labelcolor=TEXT, handlelength=1.2, borderaxespad=0, columnspacing=1.2)  # fmt: skip
    else:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, color=TEXT_DIM, ha="center", va="center")


def render(dashboard: dict[str, Any], results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    height = HEADER + max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) * ROW + FOOTER
    canvas = Canvas(plt, height)
    times = [datetime.fromtimestamp(t) for t in results["times"]]
    # Grafana shades the steps where an annotation query returns a sample.
    regions = []
    for _, values in results["annotations"]:
        on = [i for i, v in enumerate(values) if v is not None]
        for first, last in _runs(on):
            regions.append((times[first], times[min(last + 1, len(times) - 1)]))

    canvas.text(GAP + 4, 18, f"Dashboards  /  {dashboard['title']}", fontsize=17, fontweight="bold")
    canvas.text(
        GAP + 4, 46,
        f"Node: All    Time: {times[0]:%Y-%m-%d %H:%M:%S} to {times[-1]:%H:%M:%S}    "
        f"Step {STEP:g} s, $__rate_interval {max(STEP + SCRAPE_INTERVAL, 4 * SCRAPE_INTERVAL):g} s",
        fontsize=10.5, color=TEXT_DIM,
    )  # fmt: skip
    if regions:
        canvas.text(WIDTH - GAP - 4, 46, "▮ annotation: upstream down", color="#F2495C", fontsize=10.5, ha="right")
    for panel in panels:
        if panel["type"] == "row":
            column = (WIDTH - GAP) / 24
            x, y = GAP + panel["gridPos"]["x"] * column, HEADER + panel["gridPos"]["y"] * ROW
            canvas.text(x + 2, y + 10, f"⌄  {panel['title']}", fontsize=13, fontweight="bold")
        elif panel["type"] == "stat":
            draw_stat(canvas, panel, results["panels"][str(panel["id"])], times)
        else:
            draw_timeseries(canvas, panel, results["panels"][str(panel["id"])], times, regions)
    canvas.text(GAP + 4, height - FOOTER + 14, f"{LABEL} ({results['source']})", fontsize=10.5)
    canvas.text(GAP + 4, height - FOOTER + 34, results["scenario"], color=TEXT_DIM, fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.fig.savefig(out, dpi=100, facecolor=BACKGROUND)
    plt.close(canvas.fig)


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indexes as (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "dashboard.png")
    parser.add_argument("--speed", type=float, default=4.0, help="stretch the test's phases this many times")
    parser.add_argument("--rate", type=float, default=200.0, help="UDP queries per second")
    parser.add_argument("--save-results", type=Path, help="also write the query_range results to this JSON file")
    parser.add_argument("--from-results", type=Path, help="redraw from results saved by --save-results")
    args = parser.parse_args(argv)
    if not 0.5 <= args.speed <= 10 or not 1 <= args.rate <= 1000:
        parser.error("--speed must be within 0.5..10 and --rate within 1..1000 (the run is bounded)")
    dashboard = json.loads(DASHBOARD.read_text())
    if args.from_results:
        results = json.loads(args.from_results.read_text())
    else:
        total = sum(seconds for _, seconds in PHASES) * args.speed
        print(f"scripted run: about {total:.0f} s", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="render-preview-") as workdir:
            with ScriptedRun(Path(workdir), speed=args.speed, rate=args.rate) as run:
                run.play(log=sys.stderr)
                results = query_results(run, dashboard)
        results["source"] = f"Prometheus {prometheus_version()}, dashboards/render_preview.py"
    if args.save_results:
        args.save_results.write_text(json.dumps(results))
    render(dashboard, results, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
