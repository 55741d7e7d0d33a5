"""k8s/: each overlay renders with kustomize, every object validates strictly offline, and the parts
that must agree with each other (references, probes, shutdown timing, GPU wiring, autoscaling) do.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import (
    MIN_KUBERNETES,
    OVERLAYS,
    ROOT,
    check_settings,
    containers,
    object_id,
    one,
    pod_templates,
    render,
    settings_env,
    validate_objects,
)

Objects = list[dict[str, Any]]

pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")


def latest_kubernetes() -> str:
    import kubernetes_validate

    return str(kubernetes_validate.latest_version())


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", ["min", "latest"])
def test_every_object_validates_strictly(rendered: dict[str, Objects], overlay: str, version: str) -> None:
    k8s_version = MIN_KUBERNETES if version == "min" else latest_kubernetes()
    errors = validate_objects(rendered[overlay], k8s_version)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_part(rendered: dict[str, Objects], overlay: str) -> None:
    kinds = {obj["kind"] for obj in rendered[overlay]}
    expected = {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    }
    if overlay.startswith("gpu"):
        expected |= {"Job", "PersistentVolumeClaim"}
    assert expected <= kinds, f"missing: {expected - kinds}"
    namespaces = {obj["metadata"].get("namespace") for obj in rendered[overlay] if obj["kind"] != "Namespace"}
    assert namespaces == {"tiue"}, "every namespaced object lands in the tiue namespace"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(rendered: dict[str, Objects], overlay: str) -> None:
    """Every name one object uses for another exists in the same render (a hashed ConfigMap name too)."""
    objects = rendered[overlay]
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    deployment = one(objects, "Deployment", "tiue-serve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for where, pod in pod_templates(objects):
        assert ("ServiceAccount", pod["serviceAccountName"]) in names, where
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, where
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, where
        mounted = {volume["name"] for volume in pod.get("volumes", [])}
        for container in containers(pod):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names, (where, source)
            for env in container.get("env", []):
                secret = env.get("valueFrom", {}).get("secretKeyRef")
                if secret and not secret.get("optional"):
                    assert ("Secret", secret["name"]) in names, (where, env)
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in mounted, (where, mount)

    service = one(objects, "Service", "tiue-serve")
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports
    selectors = {
        "Service": service["spec"]["selector"],
        "PodDisruptionBudget": one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= pod_labels.items(), (
            f"{kind} selector {selector} misses the pods {pod_labels}"
        )
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(rendered: dict[str, Objects], overlay: str) -> None:
    """Non-root, read-only root, no privilege escalation, all capabilities dropped, seccomp on:
    the `restricted` Pod Security Standard the namespace enforces, and a writable /tmp."""
    namespace = one(rendered[overlay], "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for where, pod in pod_templates(rendered[overlay]):
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, where
        assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        for container in containers(pod):
            label = f"{where} container {container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, label
            assert security["readOnlyRootFilesystem"] is True, label
            assert security.get("privileged", False) is False, label
            assert security["capabilities"]["drop"] == ["ALL"], label
            assert not security["capabilities"].get("add"), label
            assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])}, label
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), f"{label}: pin the image tag, not {image}"
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), label
            assert "memory" in resources["limits"], label


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_graceful_shutdown(rendered: dict[str, Objects], overlay: str) -> None:
    objects = rendered[overlay]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "tiue")
    assert server["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, (
        "model load and warm-up take minutes"
    )

    settings = settings_env(objects)
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(settings["TIUE_SHUTDOWN_GRACE_S"])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain, f"grace {grace} s must exceed preStop {pre_stop} s + drain {drain} s"

    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_ones_the_service_reads(rendered: dict[str, Objects], overlay: str) -> None:
    """The service ignores unknown TIUE_* variables, so a misspelt one would silently do nothing."""
    pytest.importorskip("service.settings")
    settings, pending = check_settings(settings_env(rendered[overlay]))
    assert settings.host == "0.0.0.0" and settings.port == 8000
    if pending:
        pytest.skip(f"TIUE_TORCH_COMPILE={pending} is not a TorchCompile value in this tree yet")


def test_gpu_overlay_wiring(rendered: dict[str, Objects]) -> None:
    objects = rendered["gpu"]
    settings = settings_env(objects)
    assert settings["TIUE_BACKEND"] == "tensorrt" and settings["TIUE_DEVICE"] == "cuda"
    assert settings["TIUE_BUILD_ENGINES"] == "false", "pods load engines, they never build them on their own"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    job_pod = one(objects, "Job", "tiue-build-engines")["spec"]["template"]["spec"]
    assert job_pod["restartPolicy"] == "Never"

    builders = [job_pod["containers"][0], *pod.get("initContainers", [])]
    assert len(builders) == 2, "the Job and the Deployment's init container both build engines"
    for builder in builders:
        assert builder["args"][0] == "build-engines"
        assert builder["resources"]["limits"]["nvidia.com/gpu"] == 1
        batch = builder["args"][builder["args"].index("--batch") + 1]
        assert int(batch.split(":")[-1]) == int(settings["TIUE_MAX_BATCH_SIZE"]), (
            "engine profile max = max batch"
        )
    assert builders[0]["args"] == builders[1]["args"], (
        "the same build, so the pod finds the Job's engines cached"
    )

    server = next(c for c in pod["containers"] if c["name"] == "tiue")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    for where, spec in (("Deployment", pod), ("Job", job_pod)):
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), where
        claims = {
            v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
        }
        compile_cache = {"tiue-compile"} if where == "Deployment" else set()  # only the server compiles
        assert claims == {"tiue-models", "tiue-engines", *compile_cache}, where
    engines = one(objects, "PersistentVolumeClaim", "tiue-engines")
    assert engines["spec"]["accessModes"] == ["ReadWriteMany"], "the Job writes, every pod reads"


def test_gpu_torch_overlay_is_the_gpu_overlay_with_one_switch(rendered: dict[str, Objects]) -> None:
    """The same objects as the gpu overlay; the settings differ in the backend, its compile mode and the
    batch size (and the HPA target that follows it); the same Job and init container build its artefacts."""
    gpu, torch = rendered["gpu"], rendered["gpu-torch"]

    def ids(objects: Objects) -> set[str]:
        return {object_id(o) for o in objects if o["kind"] != "ConfigMap"}

    assert ids(torch) == ids(gpu)
    before, after = settings_env(gpu), settings_env(torch)
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    assert changed == {"TIUE_BACKEND", "TIUE_TORCH_COMPILE", "TIUE_MAX_BATCH_SIZE"}
    assert after["TIUE_BACKEND"] == "torch" and after["TIUE_TORCH_COMPILE"] == "auto"
    assert after["TIUE_BUILD_ENGINES"] == "false", "pods load the Job's artefacts, they never build them"

    pod = one(torch, "Deployment")["spec"]["template"]["spec"]
    job_pod = one(torch, "Job", "tiue-build-engines")["spec"]["template"]["spec"]
    builders = [job_pod["containers"][0], pod["initContainers"][0]]
    config = one(torch, "ConfigMap")["metadata"]["name"]
    for builder in builders:
        assert builder["args"][0] == "build-engines" and "--batch" not in builder["args"]
        assert "--backend" not in builder["args"], "the backend comes from the config, as the server's does"
        assert {"configMapRef": {"name": config}} in builder["envFrom"]
        mounts = {m["mountPath"]: m["name"] for m in builder["volumeMounts"]}
        assert mounts[after["TIUE_ENGINE_DIR"]] == "engines"
        assert mounts[after["TIUE_COMPILE_CACHE_DIR"]] == "compile", "inductor writes its caches there"
    assert builders[0]["args"] == builders[1]["args"], "the same build, so the pod finds the Job's artefacts"
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in job_pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims["compile"] == "tiue-compile"
    assert one(gpu, "Job")["spec"]["template"]["spec"]["containers"][0]["args"] != builders[0]["args"]


def test_cpu_overlay_needs_no_gpu(rendered: dict[str, Objects]) -> None:
    text = yaml.safe_dump_all(rendered["cpu"])
    assert "nvidia.com/gpu" not in text
    assert settings_env(rendered["cpu"])["TIUE_DEVICE"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_uses_the_adapter_metric(rendered: dict[str, Objects], overlay: str) -> None:
    """The HPA's custom metric is the one the prometheus-adapter rule defines, with a target of one full
    batch waiting per replica; and it scales up faster than down."""
    values = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    defined = {rule["name"]["as"] for rule in values["rules"]["custom"]}
    hpa = one(rendered[overlay], "HorizontalPodAutoscaler")
    spec = hpa["spec"]
    metrics = [m["pods"] for m in spec["metrics"] if m["type"] == "Pods"]
    assert metrics and {m["metric"]["name"] for m in metrics} <= defined
    target = float(metrics[0]["target"]["averageValue"])
    assert target == float(settings_env(rendered[overlay])["TIUE_MAX_BATCH_SIZE"])
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
    behavior = spec["behavior"]
    assert (
        behavior["scaleUp"]["stabilizationWindowSeconds"]
        < behavior["scaleDown"]["stabilizationWindowSeconds"]
    )


# --- the checks fail on broken input --------------------------------------------------------------


def broken_copy(tmp_path: Path, file: str, old: str, new: str) -> Path:
    """A copy of k8s/ with one text replacement in one file."""
    copy = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    path = copy / file
    text = path.read_text()
    assert old in text, f"{old!r} not in {file}"
    path.write_text(text.replace(old, new, 1))
    return copy


def test_validation_fails_on_an_unknown_deployment_field(tmp_path: Path) -> None:
    copy = broken_copy(tmp_path, "base/deployment.yaml", "imagePullPolicy:", "imagePullPolicyy:")
    errors = validate_objects(render(copy / "overlays" / "cpu"), latest_kubernetes())
    assert any("Deployment/tiue-serve" in e and "imagePullPolicyy" in e for e in errors), errors


def test_validation_fails_on_a_wrong_type(tmp_path: Path) -> None:
    copy = broken_copy(tmp_path, "base/deployment.yaml", "successThreshold: 1", "successThreshold: once")
    errors = validate_objects(render(copy / "overlays" / "gpu"), MIN_KUBERNETES)
    assert any("readinessProbe.successThreshold" in e and "'once'" in e for e in errors), errors


def test_validation_fails_on_a_bad_servicemonitor(tmp_path: Path) -> None:
    copy = broken_copy(tmp_path, "base/servicemonitor.yaml", "interval: 15s", "intervall: 15s")
    errors = validate_objects(render(copy / "overlays" / "cpu"), latest_kubernetes())
    assert any("ServiceMonitor" in e and "intervall" in e for e in errors), errors
    copy2 = broken_copy(tmp_path / "2", "base/servicemonitor.yaml", "interval: 15s", "interval: 15 seconds")
    errors = validate_objects(render(copy2 / "overlays" / "cpu"), latest_kubernetes())
    assert any("ServiceMonitor" in e and "15 seconds" in e for e in errors), errors


def test_validation_fails_on_a_bad_prometheusrule(tmp_path: Path) -> None:
    copy = broken_copy(tmp_path, "base/prometheusrule.yaml", "for: 5m", "forr: 5m")
    errors = validate_objects(render(copy / "overlays" / "cpu"), latest_kubernetes())
    assert any("PrometheusRule/tiue-serve" in e and "forr" in e for e in errors), errors
    copy2 = broken_copy(tmp_path / "2", "base/prometheusrule.yaml", "for: 2m", "for: two minutes")
    errors = validate_objects(render(copy2 / "overlays" / "cpu"), latest_kubernetes())
    assert any("PrometheusRule/tiue-serve" in e and "two minutes" in e for e in errors), errors


def test_validation_fails_on_a_kind_without_schema() -> None:
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert validate_objects([unknown], latest_kubernetes()) == [
        "Widget/w: no schema for example.com/v1 Widget (add one to tests/deploy/schemas)"
    ]


def test_render_fails_on_a_broken_kustomization(tmp_path: Path) -> None:
    copy = broken_copy(tmp_path, "base/kustomization.yaml", "- pdb.yaml", "- missing.yaml")
    with pytest.raises(RuntimeError, match="missing.yaml"):
        render(copy / "overlays" / "cpu")


def test_reference_check_fails_on_a_dangling_claim(tmp_path: Path) -> None:
    copy = broken_copy(
        tmp_path, "overlays/gpu/deployment.yaml", "claimName: tiue-engines", "claimName: tiue-engine"
    )
    with pytest.raises(AssertionError):
        test_references_resolve({"gpu": render(copy / "overlays" / "gpu")}, "gpu")


def test_shutdown_check_fails_when_grace_is_too_short(tmp_path: Path) -> None:
    copy = broken_copy(
        tmp_path,
        "base/deployment.yaml",
        "terminationGracePeriodSeconds: 60",
        "terminationGracePeriodSeconds: 35",
    )
    with pytest.raises(AssertionError, match="must exceed"):
        test_probes_and_graceful_shutdown({"cpu": render(copy / "overlays" / "cpu")}, "cpu")


def test_object_ids_are_unique(rendered: dict[str, Objects]) -> None:
    for overlay, objects in rendered.items():
        ids = [object_id(o) for o in objects]
        assert len(ids) == len(set(ids)), overlay
