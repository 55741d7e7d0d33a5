"""docker-compose.yml: valid against the compose spec, CPU by default with a `gpu` profile, shutdown
timing, mounts that exist, and settings the service reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import ROOT, check_settings, run, tool

COMPOSE = ROOT / "docker-compose.yml"
GPU_TORCH = ROOT / "docker-compose.gpu-torch.yml"  # `-f docker-compose.yml -f docker-compose.gpu-torch.yml`


def check_compose_spec(path: Path) -> tuple[int, str]:
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])
    return result.returncode, result.stdout + result.stderr


def services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def resolved(value: str) -> str:
    """`${NAME:-default}` as compose resolves it with NAME unset."""
    return re.sub(r"\$\{[A-Z_]+:?-([^}]*)\}", r"\1", value)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_compose_spec_valid() -> None:
    code, output = check_compose_spec(COMPOSE)
    assert code == 0, output


def test_compose_spec_fails_on_a_broken_copy(tmp_path: Path) -> None:
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["tiue"]["restart_policyy"] = "always"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(data))
    code, output = check_compose_spec(broken)
    assert code != 0 and "restart_policyy" in output, output


def test_compose_spec_fails_on_a_wrong_type(tmp_path: Path) -> None:
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["tiue"]["cap_drop"] = "ALL"  # a string where the spec wants a list
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(data))
    code, output = check_compose_spec(broken)
    assert code != 0 and "cap_drop" in output, output


def test_cpu_by_default_gpu_by_profile() -> None:
    svc = services()
    default = {name for name, s in svc.items() if not s.get("profiles")}
    assert default == {"tiue", "prometheus", "grafana"}
    for name in ("tiue-gpu", "tiue-build-engines"):
        assert svc[name]["profiles"] == ["gpu"]
        devices = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert svc["tiue"]["build"]["target"] == "cpu" and svc["tiue-gpu"]["build"]["target"] == "gpu"
    assert (
        svc["tiue-gpu"]["depends_on"]["tiue-build-engines"]["condition"] == "service_completed_successfully"
    )
    assert "nvidia" not in yaml.safe_dump(svc["tiue"])


@pytest.mark.parametrize("name", ["tiue", "tiue-gpu"])
def test_service_hardening_and_shutdown(name: str) -> None:
    service = services()[name]
    assert service["user"] == "10001:10001" and service["read_only"] is True
    assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"]
    assert any(t.startswith("/tmp") for t in service["tmpfs"])
    drain = float(service["environment"]["TIUE_SHUTDOWN_GRACE_S"])
    assert seconds(service["stop_grace_period"]) > drain, "docker must not SIGKILL while the queue drains"
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    targets = {resolved(v).split(":")[1] for v in service["volumes"]}
    assert {"/models", "/var/cache/tiue/engines"} <= targets


@pytest.mark.parametrize("name", ["tiue", "tiue-gpu"])
def test_settings_are_ones_the_service_reads(name: str) -> None:
    settings_module = pytest.importorskip("service.settings")
    env = {key: resolved(str(value)) for key, value in services()[name]["environment"].items()}
    fields = set(settings_module.Settings.model_fields)
    unknown = [key for key in env if key.removeprefix("TIUE_").lower() not in fields]
    assert not unknown, f"not Settings fields: {unknown}"
    settings_module.Settings(**{key.removeprefix("TIUE_").lower(): value for key, value in env.items()})


def test_gpu_engine_profile_matches_batch_size() -> None:
    svc = services()
    command = svc["tiue-build-engines"]["command"]
    batch = command[command.index("--batch") + 1]
    assert int(batch.split(":")[-1]) == int(svc["tiue-gpu"]["environment"]["TIUE_MAX_BATCH_SIZE"])
    assert "--model" not in command, "the build reads TIUE_MODELS: every model the service serves"
    models = resolved(svc["tiue-build-engines"]["environment"]["TIUE_MODELS"])
    assert models == resolved(svc["tiue-gpu"]["environment"]["TIUE_MODELS"])
    assert len(models.split(",")) == 2, "the example serves two models from one volume"


def test_bind_mounts_exist() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = resolved(volume).split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_prometheus_scrapes_the_services() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tiue")
    names = {n for sd in job["dns_sd_configs"] for n in sd["names"]}
    assert names == {"tiue", "tiue-gpu"} and names <= services().keys()
    assert all(sd["port"] == 8000 for sd in job["dns_sd_configs"])
    assert job["metrics_path"] == "/metrics"


# --- the torch-backend switch: docker-compose.gpu-torch.yml over the gpu profile ----------------------


def merged_services(override: Path) -> dict[str, Any]:
    """docker-compose.yml with an override file on top, by compose's merge rules for the keys it uses:
    mappings merge key by key, `command` is replaced, `volumes` merge by their path in the container."""

    def merge(base: Any, extra: Any, key: str = "") -> Any:
        if key == "volumes" and isinstance(base, list):
            by_target = {resolved(v).split(":")[1]: v for v in base}
            by_target.update({resolved(v).split(":")[1]: v for v in extra})
            return list(by_target.values())
        if isinstance(base, dict) and isinstance(extra, dict):
            return {k: merge(base[k], v, k) if k in base else v for k, v in {**base, **extra}.items()}
        return extra

    return dict(merge(services(), yaml.safe_load(override.read_text())["services"]))


def test_gpu_torch_override_is_valid() -> None:
    code, output = check_compose_spec(GPU_TORCH)
    assert code == 0, output
    assert yaml.safe_load(GPU_TORCH.read_text())["name"] == yaml.safe_load(COMPOSE.read_text())["name"]


def test_gpu_torch_override_switches_the_gpu_services_only() -> None:
    before, after = services(), merged_services(GPU_TORCH)
    assert {name for name in after if after[name] != before[name]} == {"tiue-gpu", "tiue-build-engines"}
    assert after["tiue-gpu"]["profiles"] == after["tiue-build-engines"]["profiles"] == ["gpu"]
    env_before, env = before["tiue-gpu"]["environment"], after["tiue-gpu"]["environment"]
    changed = {key for key in env if env[key] != env_before.get(key)}
    assert changed == {"TIUE_BACKEND", "TIUE_TORCH_COMPILE", "TIUE_MAX_BATCH_SIZE"}
    assert env["TIUE_BACKEND"] == "torch" and env["TIUE_TORCH_COMPILE"] == "auto"
    assert env["TIUE_BUILD_ENGINES"] == "false", "it loads the build step's artefacts, it never builds"

    build = after["tiue-build-engines"]
    command = build["command"]
    assert command[0] == "build-engines" and "--batch" not in command
    assert command[command.index("--backend") + 1] == "torch"

    def built_with(name: str) -> str | None:
        """A setting as the build reads it: its flag, else its TIUE_* variable."""
        flag = "--" + name.lower().replace("_", "-")
        if flag in command:
            return str(command[command.index(flag) + 1])
        value = build["environment"].get(f"TIUE_{name}")
        return None if value is None else resolved(str(value))

    # the packages are keyed by these: built with other values, the server would not find them
    for name in ("DEVICE", "PRECISION", "MAX_BATCH_SIZE", "MODELS", "ENGINE_DIR", "COMPILE_CACHE_DIR"):
        assert built_with(name) == resolved(str(env[f"TIUE_{name}"])), name
    mounts = {resolved(v).split(":")[1]: resolved(v).split(":")[0] for v in build["volumes"]}
    served = {resolved(v).split(":")[1]: resolved(v).split(":")[0] for v in after["tiue-gpu"]["volumes"]}
    for path in (env["TIUE_ENGINE_DIR"], env["TIUE_COMPILE_CACHE_DIR"]):
        assert mounts[path] == served[path], f"{path}: the build writes where the service reads"


def test_gpu_torch_settings_are_ones_the_service_reads() -> None:
    pytest.importorskip("service.settings")
    env = {
        key: resolved(str(value))
        for key, value in merged_services(GPU_TORCH)["tiue-gpu"]["environment"].items()
    }
    settings, pending = check_settings(env)
    assert settings.backend.value == "torch" and settings.max_batch_size == 16
    if pending:
        pytest.skip(f"TIUE_TORCH_COMPILE={pending} is not a TorchCompile value in this tree yet")
