"""The Grafana dashboard: well-formed, every panel queried, every metric it names exposed by a running proxy."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT, query
from dashboards import render_preview
from servers import free_port

DASHBOARD_PATH = REPO_ROOT / "dashboards" / "kube-dns-proxy.json"
DATASOURCE_UID = "${DS_PROMETHEUS}"
INSTANCE_MATCHER = 'instance=~"$instance"'
# PromQL words that look like metric names but are not (functions are recognised by their "(").
PROMQL_KEYWORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan"}
# Which sample names a scraped family of each type is queried by (Prometheus exposition format).
SUFFIXES_BY_TYPE = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


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


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text of the dashboard: panel targets, annotation queries, query variables."""
    texts = [target["expr"] for panel in data_panels(dashboard) for target in panel.get("targets", [])]
    texts += [annotation["expr"] for annotation in dashboard["annotations"]["list"] if "expr" in annotation]
    texts += [variable["definition"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    return texts


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers left after removing strings, matchers,
    ranges, grouping label lists, Grafana variables, label_values' label and function calls."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = re.sub(r"\blabel_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r" \1 ", text)
    names = set(re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", text))
    return {name for name in names if name.lower() not in PROMQL_KEYWORDS and not re.fullmatch(r"\d.*", name)}


def exposed_names(metrics_text: str) -> set[str]:
    """The sample names Prometheus stores for the families of one scrape, with type suffixes."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + suffix for suffix in SUFFIXES_BY_TYPE.get(family.type, ("",)))
    return names


def start_queried_proxy(proxy_factory, fake_upstream) -> int:
    """Start a proxy with --http, send it misses, hits and a NODATA; return its HTTP port."""
    http_port = free_port()
    proxy = proxy_factory("--upstream", fake_upstream.address, "--http", f"127.0.0.1:{http_port}")
    for qname in ("a.example", "b.example", "a.example", "a.example", "b.example"):
        query(proxy.address, qname)
    query(proxy.address, "a.example", "AAAA")
    query(proxy.address, "a.example", tcp=True)
    return http_port


def scrape(http_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        return response.read().decode()


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


def test_metric_name_extraction_ignores_functions_labels_and_variables():
    """metric_names() returns the selected metrics only, not functions, grouping labels, matchers or variables."""
    expr = (
        "histogram_quantile(0.99, sum by (le, cache) (rate(kube_dns_proxy_answer_duration_seconds_bucket"
        '{instance=~"$instance"}[$__rate_interval]))) / ignoring (cache) max(coredns_dns_requests_total) > bool 0'
    )
    assert metric_names(expr) == {"kube_dns_proxy_answer_duration_seconds_bucket", "coredns_dns_requests_total"}
    assert metric_names("label_values(kube_dns_proxy_queries_total, instance)") == {"kube_dns_proxy_queries_total"}


def test_every_metric_in_the_dashboard_is_exposed_by_the_proxy(proxy_factory, fake_upstream):
    """Each metric name in the dashboard's PromQL is a sample name of a family the running proxy serves on /metrics."""
    http_port = start_queried_proxy(proxy_factory, fake_upstream)
    exposed = exposed_names(scrape(http_port))
    used = set().union(*(metric_names(expr) for expr in expressions(load_dashboard())))
    assert len(used) >= 15
    assert used - exposed == set()


def test_every_panel_returns_series_from_a_running_proxy(proxy_factory, fake_upstream):
    """Evaluated on two real scrapes, every target returns samples carrying the labels its legend names."""
    http_port = start_queried_proxy(proxy_factory, fake_upstream)
    store = render_preview.Store()
    target_labels = {"instance": f"127.0.0.1:{http_port}", "job": "kube-dns-proxy"}
    store.add_scrape(time.time(), scrape(http_port), target_labels)
    time.sleep(1.0)  # rate() needs two samples of each counter inside its window
    store.add_scrape(time.time(), scrape(http_port), target_labels)
    for panel in data_panels(load_dashboard()):
        for target in panel["targets"]:
            parsed = render_preview.Parser(render_preview.substitute(target["expr"], ".*")).parse()
            result = render_preview.evaluate(parsed, store, store.times[-1])
            assert result, (panel["title"], target["expr"])
            for labels in result:
                wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
                assert wanted <= {name for name, _ in labels}, (panel["title"], wanted)
