"""The alerting rules: promtool accepts them, its unit tests fire each alert, the PrometheusRule has the same groups."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter as yamllint_linter

from conftest import REPO_ROOT
from test_manifests import YAMLLINT_CONFIG

RULES = REPO_ROOT / "dashboards" / "alerts.rules.yaml"
PROMETHEUS_RULE = REPO_ROOT / "dashboards" / "prometheusrule.yaml"
RULE_TESTS = REPO_ROOT / "tests" / "alerts_test.yaml"
README = REPO_ROOT / "README.md"
SEVERITIES = {"warning", "critical"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: ./dev.sh setup installs the Debian package prometheus"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def plain_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["groups"]


def alerts() -> list[dict[str, Any]]:
    return [rule for group in plain_groups() for rule in group["rules"]]


def test_promtool_check_rules_passes():
    """`promtool check rules` accepts the plain rule file (syntax, PromQL, templates) and counts five rules."""
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_promtool_unit_tests_pass():
    """`promtool test rules tests/alerts_test.yaml` passes: each alert fires where it should, nowhere else."""
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test():
    """Each alert of the rule file is expected to fire in at least one case of the promtool unit tests."""
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    quiet = {check["alertname"] for case in cases for check in case["alert_rule_test"] if not check["exp_alerts"]}
    names = {rule["alert"] for rule in alerts()}
    assert firing == names
    assert quiet == names


def test_every_alert_has_severity_summary_and_description():
    """Each alert waits (`for`), carries a severity label and says what happened in summary and description."""
    for rule in alerts():
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


def test_prometheusrule_carries_the_same_groups():
    """spec.groups of the PrometheusRule equals the plain file's groups, comments and text included."""
    manifest = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["name"] == "kube-dns-proxy"
    assert manifest["spec"]["groups"] == plain_groups()
    plain_text = RULES.read_text().split("\ngroups:\n", 1)[1]
    spec_text = PROMETHEUS_RULE.read_text().split("\nspec:\n  groups:\n", 1)[1]
    assert "".join(line[2:] if line.strip() else line for line in spec_text.splitlines(keepends=True)) == plain_text


@pytest.mark.parametrize("path", [RULES, PROMETHEUS_RULE, RULE_TESTS], ids=lambda p: p.name)
def test_yamllint_clean(path: Path):
    """yamllint, with daemonset.yaml's rules (default, 120 columns), reports nothing, warnings included."""
    conf = yamllint_config.YamlLintConfig(content=YAMLLINT_CONFIG)
    problems = list(yamllint_linter.run(path.read_text(), conf, str(path)))
    assert [f"{p.line}:{p.column} {p.message} ({p.rule})" for p in problems] == []


def test_readme_documents_every_alert():
    """README.md's alert table has a row for each alert with its `for` and severity."""
    readme = README.read_text()
    for rule in alerts():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{rule['alert']}`")), "")
        assert f"`{rule['for']}`" in row and rule["labels"]["severity"] in row, rule["alert"]
