"""Grafana dashboard, Grafana provisioning, Prometheus config and the prometheus-adapter rule: every
query parses as PromQL, names only metrics the service exports, and the dashboard shows what an
operator needs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from deploy_checks import ROOT, service_metrics, service_series
from deploy_checks import promql_metric_names as metric_names

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tiue-serve.json"
ADAPTER = ROOT / "k8s" / "prometheus-adapter" / "values.yaml"

GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$instance": ".*",
    "$route": ".*",
    "$model": ".*",
    "$__range": "1h",
}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in panels(dash):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def substitute(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return expr


def adapter_queries() -> list[str]:
    """The adapter rule's series and metrics queries, with its Go-template placeholders filled in."""
    fill = {
        "<<.Series>>": "tiue_queue_depth",
        "<<.LabelMatchers>>": 'namespace="tiue",pod=~"tiue-serve-.*"',
        "<<.GroupBy>>": "pod",
    }
    queries = []
    for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]:
        query = rule["metricsQuery"]
        for placeholder, value in fill.items():
            query = query.replace(placeholder, value)
        queries += [rule["seriesQuery"], query]
    return queries


def test_every_query_parses_and_uses_metrics_the_service_registers() -> None:
    """Names are read from service/metrics.py's registry: a renamed metric fails here, not on a dashboard."""
    known = service_series()
    queries = [(title, substitute(expr)) for title, expr in expressions(dashboard())]
    queries += [("prometheus-adapter", q) for q in adapter_queries()]
    assert len(queries) > 20
    for where, expr in queries:
        names = metric_names(expr)  # raises ValueError on a syntax error
        assert names and names <= known, f"{where}: {expr} uses {names - known}"


def test_query_check_fails_on_broken_promql() -> None:
    with pytest.raises(ValueError):
        metric_names("sum(rate(tiue_images_generated_total[1m])")
    assert metric_names("rate(tiue_image_generated_total[1m])") - service_series() == {
        "tiue_image_generated_total"
    }


def test_dashboard_shows_what_the_operator_needs() -> None:
    text = "\n".join(expr for _, expr in expressions(dashboard()))
    required = {
        "request rate": r"rate\(tiue_request_duration_seconds_count",
        "p50 latency": r"histogram_quantile\(0\.5, sum by \(le\) \(rate\(tiue_request_duration_seconds_bucket",
        "p95 latency": r"histogram_quantile\(0\.95, sum by \(le\) \(rate\(tiue_request_duration_seconds_bucket",
        "p99 latency": r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(tiue_request_duration_seconds_bucket",
        "images/s": r"rate\(tiue_images_generated_total",
        "batch size": r"tiue_batch_size_images_(bucket|sum)",
        "queue depth": r"tiue_queue_depth\{",
        "queue wait": r"histogram_quantile\([^,]+, sum by \(le\) \(rate\(tiue_queue_wait_seconds_bucket",
        "rejections by reason": r"sum by \(reason\) \(rate\(tiue_requests_rejected_total",
        "per-stage time": r"sum by \(stage\) \(rate\(tiue_stage_duration_seconds_sum",
        "device utilisation": r"sum by \(instance\) \(rate\(tiue_device_busy_seconds_total",
        "error rate": r'sum\(rate\(tiue_request_duration_seconds_count\{[^}]*status=~"5\.\."[^}]*\}\[\$__rate_interval\]\)\) / sum',
        "availability over the range": r'1 - sum\(increase\(tiue_request_duration_seconds_count\{[^}]*status=~"5\.\."',
        "warm-up time": r"tiue_warmup_seconds\{",
        "queue fill": r"tiue_queue_depth\{[^}]*\} / tiue_queue_capacity_images",
        "connections refused": r"rate\(tiue_connections_refused_total",
        "connections timed out": r"rate\(tiue_connections_timed_out_total",
        "discarded images": r"sum by \(reason\) \(rate\(tiue_images_discarded_total",
        "skipped images": r"sum by \(reason\) \(rate\(tiue_images_skipped_total",
        "truncated prompts": r"rate\(tiue_prompts_truncated_total",
    }
    missing = [what for what, pattern in required.items() if not re.search(pattern, text)]
    assert not missing, f"the dashboard lacks {missing}"


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] == "tiue-serve" and dash["title"]
    ids = [panel["id"] for panel in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "route", "model"} <= variables
    occupied: set[tuple[int, int]] = set()
    for panel in panels(dash):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]


def test_grafana_provisioning_matches_compose() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in compose["volumes"] if v.startswith("./"))
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/tiue.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    source = datasource["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    default = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert default["current"]["value"] == source["uid"]
    home = compose["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{mounts['./deploy/grafana/dashboards']}/{DASHBOARD.name}"


def test_the_model_selector_filters_every_model_labelled_metric() -> None:
    """Each selector of a metric with a `model` label carries `model=~"$model"`; the others cannot."""
    model_labelled = {name for name, (_, labels) in service_metrics().items() if "model" in labels}
    assert {"tiue_images_generated", "tiue_request_duration_seconds", "tiue_warmup_seconds"} <= model_labelled
    unfiltered = []
    for title, expr in expressions(dashboard()):
        for match in re.finditer(r"(tiue_\w+)\{([^}]*)\}", expr):
            name, selector = match.group(1), match.group(2)
            labelled = any(name.startswith(metric) for metric in model_labelled)
            if labelled != ('model=~"$model"' in selector):
                unfiltered.append(f"{title}: {match.group(0)}")
    assert not unfiltered, unfiltered
