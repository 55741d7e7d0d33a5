"""Alert rules: deploy/prometheus/alerts.yml (compose's Prometheus) and its copy in the PrometheusRule
(k8s/base/prometheusrule.yaml). Every expression parses and reads only metrics service/metrics.py
registers (or rules recorded here); the alerts an operator needs exist; `promtool check` accepts the
config and rules and `promtool test rules` runs their unit tests (deploy/prometheus/alerts.test.yml).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import ROOT, promql_metric_names, run, service_series, tool

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts.test.yml"
PROMETHEUS_RULE = ROOT / "k8s" / "base" / "prometheusrule.yaml"
PROMTOOL_INSTALL = "Debian: apt-get install -y prometheus (the README's test command does)"

# What the alerts must cover, and the metrics each one reads (so that it watches the right thing).
REQUIRED = {
    "TiueErrorRateHigh": {"tiue:generation_errors:ratio_rate1h", "tiue:generation_errors:ratio_rate5m"},
    "TiueErrorBudgetBurning": {"tiue:generation_errors:ratio_rate6h", "tiue:generation_errors:ratio_rate30m"},
    "TiueLatencyOverTimeout": {"tiue_request_duration_seconds_bucket", "tiue_request_timeout_seconds"},
    "TiueQueueSaturated": {"tiue_queue_depth", "tiue_queue_capacity_images", "tiue_requests_rejected_total"},
    "TiueNoReadyReplica": {"tiue_ready"},
    "TiueWarmupTooLong": {"tiue_ready"},
}


def groups(path: Path = RULES) -> list[dict[str, Any]]:
    return list(yaml.safe_load(path.read_text())["groups"])


def rules(path: Path = RULES) -> list[dict[str, Any]]:
    return [rule for group in groups(path) for rule in group["rules"]]


def test_every_expression_reads_metrics_the_service_registers() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    known = service_series() | recorded
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        names = promql_metric_names(rule["expr"])  # raises ValueError on a syntax error
        assert names and names <= known, f"{name}: {rule['expr']} uses {names - known}"


def test_the_alerts_an_operator_needs_exist() -> None:
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    assert REQUIRED.keys() <= alerts.keys(), f"missing: {REQUIRED.keys() - alerts.keys()}"
    for name, metrics in REQUIRED.items():
        assert promql_metric_names(alerts[name]["expr"]) == metrics, name
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name


def test_the_prometheusrule_holds_the_same_groups() -> None:
    """One set of rules: the Kubernetes object carries a copy of the file's groups, kept equal here."""
    prometheus_rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert prometheus_rule["kind"] == "PrometheusRule"
    assert prometheus_rule["spec"]["groups"] == groups(), (
        "k8s/base/prometheusrule.yaml's spec.groups differ from deploy/prometheus/alerts.yml: change both"
    )
    kustomization = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())
    assert PROMETHEUS_RULE.name in kustomization["resources"]


def test_the_dashboard_shows_the_slo_the_alerts_burn() -> None:
    """The error budget is written in three places: the burn-rate alerts, the error-rate panel's red line
    and the availability stat's green step."""
    budget = 0.01
    burns = [
        rule["expr"]
        for rule in rules()
        if rule.get("alert") in ("TiueErrorRateHigh", "TiueErrorBudgetBurning")
    ]
    assert burns and all(f" * {budget})" in expr for expr in burns), burns
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "tiue-serve.json").read_text())
    by_title = {panel["title"]: panel for panel in dashboard["panels"]}
    line = by_title["Error rate vs SLO"]["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]
    assert line == {"color": "red", "value": budget}
    green = by_title["Availability (SLO 99 %)"]["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]
    assert green == {"color": "green", "value": 1 - budget}


def test_compose_prometheus_loads_the_rules() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["prometheus"]
    mounts = dict(volume.split(":")[:2] for volume in compose["volumes"] if volume.startswith("./"))
    config_dir = Path(mounts["./deploy/prometheus/prometheus.yml"]).parent
    loaded = {str(config_dir / path) for path in config["rule_files"]}  # relative to the config file
    assert mounts["./deploy/prometheus/alerts.yml"] in loaded
    assert (PROMETHEUS / config["rule_files"][0]).resolve() == RULES  # and so does promtool, here


def promtool(*arguments: str) -> tuple[int, str]:
    result = run([tool("promtool", PROMTOOL_INSTALL), *arguments])
    return result.returncode, result.stdout + result.stderr


def test_promtool_checks_the_config_and_its_rules() -> None:
    code, output = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert code == 0, output
    assert f"SUCCESS: {len(rules())} rules found" in output, output


def test_promtool_unit_tests_pass() -> None:
    code, output = promtool("test", "rules", str(RULE_TESTS))
    assert code == 0 and "SUCCESS" in output, output


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("sum by (job) (tiue_ready) < 1", "sum by (job) (tiue_ready) < 0"),  # never fires
        ("> (14.4 * 0.01)", "> (44.4 * 0.01)"),  # misses a 25 % error rate
        ("tiue_queue_depth / tiue_queue_capacity_images) > 0.8", "tiue_queue_depth) > 80"),
    ],
)
def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path, old: str, new: str) -> None:
    text = RULES.read_text()
    assert old in text, f"{old!r} is no longer in alerts.yml: update this test"
    (tmp_path / RULES.name).write_text(text.replace(old, new, 1))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    code, output = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert code != 0 and "FAILED" in output, output


def test_promtool_check_fails_on_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "alerts.yml"
    broken.write_text(RULES.read_text().replace("for: 5m", "for: five minutes", 1))
    code, output = promtool("check", "rules", str(broken))
    assert code != 0, output
