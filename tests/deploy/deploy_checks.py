"""The checks behind tests/deploy: find a tool, render a kustomize overlay, validate objects offline.

Kept apart from the tests so that each check runs the same way on the real files and on the
deliberately broken copies that prove it can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = ("cpu", "gpu", "gpu-torch")

# Oldest Kubernetes minor the manifests promise to work on, and the newest kubernetes-validate knows.
MIN_KUBERNETES = "1.29.0"

# Custom resources have no schema in kubernetes-validate; these are validated against our own
# strict schemas instead (see schemas/*.json). A kind in neither place is an error, never a warning.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}


def tool(name: str, install: str = "pip install -e '.[dev]' provides it") -> str:
    """Path of a command-line tool from the dev extra (or the test command's apt line): next to this
    Python first, then PATH.

    Missing tools skip the test on a developer machine but fail it in CI, where they are installed
    and a skip would hide a check that silently stopped running.
    """
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: {install}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(command: list[str], cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def render(kustomization_dir: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed; raises with kubectl's message when the build fails."""
    result = run([tool("kubectl"), "kustomize", str(kustomization_dir)])
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization_dir} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def object_id(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


@cache
def _crd_validator(schema_file: str) -> Any:
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    schema = json.loads((SCHEMAS / schema_file).read_text())
    definitions_path = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{kubernetes_validate.latest_version()}-local-strict"
        / "_definitions.json"
    )
    definitions = json.loads(definitions_path.read_text())
    registry: Registry = Registry().with_resources(
        [
            ("/api/_definitions.json", Resource.from_contents(definitions)),
            (schema["$id"], Resource.from_contents(schema)),
        ]
    )
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema, registry=registry)


def validate_objects(objects: Iterable[dict[str, Any]], kubernetes_version: str) -> list[str]:
    """Every object strictly against its schema; returns one message per problem (empty: all valid)."""
    import kubernetes_validate

    errors: list[str] = []
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in CRD_SCHEMAS:
            validator = _crd_validator(CRD_SCHEMAS[key])  # type: ignore[index]
            errors += [
                f"{object_id(obj)}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(obj)
            ]
            continue
        try:
            kubernetes_validate.validate(obj, kubernetes_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(
                f"{object_id(obj)}: no schema for {key[0]} {key[1]} (add one to tests/deploy/schemas)"
            )
        except kubernetes_validate.ValidationError as error:
            path = ".".join(map(str, error.path))
            errors.append(f"{object_id(obj)} (Kubernetes {kubernetes_version}): {path}: {error.message}")
    return errors


def pod_templates(objects: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(object id, pod spec) for every workload that runs pods."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield object_id(obj), obj["spec"]["template"]["spec"]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def one(objects: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[object_id(o) for o in found]}"
    return found[0]


def settings_env(objects: Iterable[dict[str, Any]]) -> dict[str, str]:
    """The TIUE_* settings an overlay gives the server (its generated ConfigMap)."""
    config_maps = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("tiue-config")
    ]
    assert len(config_maps) == 1, [object_id(o) for o in config_maps]
    return dict(config_maps[0]["data"])


def check_settings(env: dict[str, str]) -> tuple[Any, str | None]:
    """(`Settings` from TIUE_* values as the service reads them, a pending value). A TIUE_TORCH_COMPILE value
    this tree's TorchCompile does not have yet is left out of the check and returned as pending (the caller
    skips with it once everything else has passed)."""
    from engine.types import TorchCompile
    from service.settings import Settings

    fields = set(Settings.model_fields)
    unknown = [key for key in env if key.removeprefix("TIUE_").lower() not in fields]
    assert not unknown, f"not Settings fields: {unknown}"
    mode = env.get("TIUE_TORCH_COMPILE")
    pending = mode if mode is not None and mode not in {m.value for m in TorchCompile} else None
    values = {
        k.removeprefix("TIUE_").lower(): v
        for k, v in env.items()
        if not (pending and k == "TIUE_TORCH_COMPILE")
    }
    return Settings(**values), pending


@cache
def service_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, label names) of every metric service/metrics.py registers, read from its registry:
    what dashboards and alert rules may use. A counter's name is without `_total`, as Prometheus' own
    client names the family."""
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics(max_batch_size=8)
    labels = {
        metric.describe()[0].name: frozenset(metric._labelnames)  # the client keeps them only here
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
    }
    return {
        family.name: (family.type, labels.get(family.name, frozenset()))
        for family in metrics.registry.collect()
    }


def service_series() -> set[str]:
    """The series names those metrics are queried by (a histogram's _bucket, _sum and _count, a counter's _total)."""
    names: set[str] = set()
    for name, (kind, _) in service_metrics().items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(f"{name}_total" if kind == "counter" else name)
    return names


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects; raises ValueError on a syntax error."""
    promql = pytest.importorskip("promql_parser", reason="promql-parser is in the dev extra")
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql.walk(promql.parse(expr), visit)
    return names
