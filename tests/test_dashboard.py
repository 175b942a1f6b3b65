"""The Grafana dashboard: well-formed, and every query it sends answered by a real Prometheus scraping a real proxy.

The e2e tests share one scripted run (tests/promlab.py, about 25 s): FakeUpstream answering, then
silent, then closed, then answering; proxy.py serving a query mix through it; Prometheus scraping
/metrics every second. Each panel's expr is interpolated as Grafana would and sent to the HTTP API.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import REPO_ROOT
from promlab import JOB, SCRAPE_INTERVAL, ScriptedRun, grafana_interpolate

DASHBOARD_PATH = REPO_ROOT / "dashboards" / "kube-dns-proxy.json"
DATASOURCE_UID = "${DS_PROMETHEUS}"
INSTANCE_MATCHER = 'instance=~"$instance"'
JOB_SELECTOR = f'{{job="{JOB}"}}'
STEP = SCRAPE_INTERVAL  # Grafana's $__interval for a range of seconds: the data source's scrape interval
ALERT_NAMES = ("KubeDnsProxyServingStale", "KubeDnsProxyUpstreamDown")  # what the outage must set pending


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_PATH.read_text())


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but row headers, including those folded inside collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def targets() -> list[Any]:
    """One pytest param per panel target: (expr, legendFormat), named after the panel."""
    return [
        pytest.param(target["expr"], target.get("legendFormat", ""), id=f"{panel['title']}-{target['refId']}")
        for panel in data_panels(load_dashboard())
        for target in panel["targets"]
    ]


def all_values() -> dict[str, str]:
    return {v["name"]: v["allValue"] for v in load_dashboard()["templating"]["list"] if v["type"] == "query"}


def legend_labels(legend_format: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend_format))


def numbers(series: list[dict[str, Any]]) -> list[float]:
    """Every finite value of a query_range result."""
    values = (float(value) for item in series for _, value in item["values"])
    return [value for value in values if math.isfinite(value)]


def test_dashboard_declares_datasource_and_node_variables():
    """The dashboard is schema-39 Grafana JSON with a Prometheus datasource variable and a multi-node variable."""
    dashboard = load_dashboard()
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert dashboard["schemaVersion"] == 39
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]


def test_every_panel_has_a_title_and_a_target():
    """Every panel that is not a row header has a title and at least one target with an expression."""
    panels = data_panels(load_dashboard())
    assert len(panels) >= 15
    for panel in panels:
        assert panel.get("title"), panel
        assert [target for target in panel.get("targets", []) if target.get("expr", "").strip()], panel["title"]


def test_every_query_uses_the_datasource_variable():
    """Every panel and target queries the ${DS_PROMETHEUS} datasource, so importing asks for one Prometheus."""
    for panel in data_panels(load_dashboard()):
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]


def test_every_selector_is_filtered_by_the_node_variable():
    """Every metric selector in panels and annotations carries instance=~"$instance", so the node picker applies."""
    dashboard = load_dashboard()
    texts = [target["expr"] for panel in data_panels(dashboard) for target in panel["targets"]]
    texts += [annotation["expr"] for annotation in dashboard["annotations"]["list"] if "expr" in annotation]
    selectors = [match for text in texts for match in re.finditer(r"\bkube_dns_proxy_\w+(\{[^}]*\})?", text)]
    assert len(selectors) >= 20
    for match in selectors:
        assert INSTANCE_MATCHER in (match.group(1) or ""), match.group(0)


def test_panel_ids_are_unique():
    """No two panels share an id (Grafana keys panel state and links by id)."""
    ids = [panel["id"] for panel in load_dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_fit_the_24_column_grid():
    """Every panel lies within Grafana's 24 columns and no two panels overlap."""
    taken: set[tuple[int, int]] = set()
    for panel in load_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, panel["title"]
        taken |= cells


class TestGrafanaInterpolation:
    """grafana_interpolate() replaces the dashboard's variables as Grafana's Prometheus data source does."""

    def test_all_nodes_become_the_custom_all_value(self):
        """With All selected, $instance is the variable's allValue, unescaped."""
        expr = 'up{instance=~"$instance"}'
        assert grafana_interpolate(expr, {"instance": None}, {"instance": ".*"}, 1.0) == 'up{instance=~".*"}'

    def test_selected_nodes_are_regex_escaped(self):
        """One node is its value with each regex metacharacter behind two backslashes; two are (a|b)."""
        one = grafana_interpolate('x{instance=~"$instance"}', {"instance": ["10.0.0.1:9254"]}, {}, 1.0)
        assert one == r'x{instance=~"10\\.0\\.0\\.1:9254"}'
        two = grafana_interpolate("${instance}", {"instance": ["a.b", "c"]}, {}, 1.0)
        assert two == r"(a\\.b|c)"

    @pytest.mark.parametrize(
        ("step", "scrape", "expected"),
        [(1.0, 1.0, "[4s]"), (60.0, 15.0, "[75s]"), (15.0, 15.0, "[60s]"), (0.5, 1.0, "[4s]")],
    )
    def test_rate_interval_is_grafanas(self, step, scrape, expected):
        """$__rate_interval is max($__interval + scrape interval, 4 x scrape interval)."""
        assert grafana_interpolate("[$__rate_interval]", {}, {}, step, scrape) == expected

    def test_an_unknown_variable_raises(self):
        """A variable the dashboard does not define fails loudly instead of reaching Prometheus."""
        with pytest.raises(KeyError):
            grafana_interpolate('x{node=~"$node"}', {"instance": None}, {"instance": ".*"}, 1.0)


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScriptedRun]:
    """One scripted outage for the module: upstream, proxy and Prometheus on loopback, stopped afterwards."""
    with ScriptedRun(tmp_path_factory.mktemp("promlab")) as run:
        run.play()
        yield run


def interpolated(expr: str, instances: list[str] | None) -> str:
    return grafana_interpolate(expr, {"instance": instances}, all_values(), STEP)


@pytest.mark.e2e  # proxy.py, a FakeUpstream and prometheus on loopback
class TestOnARealPrometheus:
    """Every query of the dashboard, sent to a real Prometheus that scraped a proxy through an upstream outage."""

    def test_node_variable_lists_the_proxy(self, scripted_run):
        """The Node variable's label_values(kube_dns_proxy_queries_total, instance) finds the proxy's instance."""
        prometheus = scripted_run.prometheus
        definition = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "instance")["definition"]
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", definition).groups()
        assert prometheus.label_values(label, metric) == [scripted_run.instance]

    @pytest.mark.parametrize(("expr", "legend_format"), targets())
    def test_target_returns_series_over_the_run(self, scripted_run, expr, legend_format):
        """query_range over the run, all nodes: the expr parses and returns series with numbers and legend labels."""
        prometheus = scripted_run.prometheus
        series = prometheus.query_range(interpolated(expr, None), scripted_run.start, scripted_run.end, STEP)
        assert series, f"no series; Prometheus has {prometheus.label_values('__name__', JOB_SELECTOR)}"
        assert numbers(series), series
        for item in series:
            assert legend_labels(legend_format) <= item["metric"].keys(), item["metric"]

    @pytest.mark.parametrize(("expr", "legend_format"), targets())
    def test_target_answers_an_instant_query_for_one_node(self, scripted_run, expr, legend_format):
        """/api/v1/query at the end of the outage, the proxy's node picked by its escaped name: at least one series."""
        prometheus = scripted_run.prometheus
        down = next(phase for phase in scripted_run.phases if phase.mode == "down")
        assert prometheus.query(interpolated(expr, [scripted_run.instance]), down.end)

    def test_annotation_marks_the_outage_only(self, scripted_run):
        """The "Upstream down" annotation query returns samples during the silent or closed upstream only."""
        (annotation,) = [a for a in load_dashboard()["annotations"]["list"] if "expr" in a]
        series = scripted_run.prometheus.query_range(
            interpolated(annotation["expr"], None), scripted_run.start, scripted_run.end, STEP
        )
        assert series
        hang = next(phase for phase in scripted_run.phases if phase.mode == "hang")
        down = next(phase for phase in scripted_run.phases if phase.mode == "down")
        marked = [float(t) for item in series for t, _ in item["values"]]
        # Slack: the proxy marks down after failed tries, probes back within 0.5 s, scrapes are 1 s apart.
        assert all(hang.start <= t <= down.end + 3 * SCRAPE_INTERVAL for t in marked), (marked, hang, down)
        assert any(down.start <= t <= down.end for t in marked)

    def test_outage_shows_in_the_panels(self, scripted_run):
        """The run has what the panels are for: stale answers, an upstream down, NXDOMAIN and SERVFAIL answers."""
        prometheus, start, end = scripted_run.prometheus, scripted_run.start, scripted_run.end
        assert max(numbers(prometheus.query_range("rate(kube_dns_proxy_stale_answers_total[4s])", start, end, 1)))
        assert min(numbers(prometheus.query_range("kube_dns_proxy_upstream_up", start, end, 1))) == 0
        rcodes = {item["metric"]["rcode"] for item in prometheus.query("kube_dns_proxy_responses_total", end)}
        assert {"NOERROR", "NXDOMAIN", "SERVFAIL"} <= rcodes

    def test_alert_rules_evaluate_on_the_real_metrics(self, scripted_run):
        """dashboards/alerts.rules.yaml loaded into the run's Prometheus: every rule evaluates without error."""
        groups = scripted_run.prometheus.api("rules", {})["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == 5
        assert [(rule["name"], rule["health"], rule.get("lastError", "")) for rule in rules] == [
            (rule["name"], "ok", "") for rule in rules
        ]

    def test_the_outage_sets_its_alerts_pending(self, scripted_run):
        """During the outage the stale-serving and upstream-down alerts become pending (their `for` is minutes)."""
        series = scripted_run.prometheus.query_range(
            'ALERTS{alertstate="pending"}', scripted_run.start, scripted_run.end + 2 * SCRAPE_INTERVAL, STEP
        )
        assert set(ALERT_NAMES) <= {item["metric"]["alertname"] for item in series}
