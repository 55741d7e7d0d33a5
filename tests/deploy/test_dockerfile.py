"""Dockerfile: hadolint finds nothing at its strictest threshold, and the image keeps its promises
(two targets, cpu the default, non-root, HEALTHCHECK on /livez, volumes, the torch pin)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from deploy_checks import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


def hadolint(path: Path) -> tuple[int, str]:
    # "style" is the lowest severity: any finding at all fails.
    result = run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(path)])
    return result.returncode, result.stdout + result.stderr


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined), in file order."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = result.setdefault(match.group(1), [])
        if current is not None:
            current.append(line)
    return result


def test_hadolint_is_clean() -> None:
    code, output = hadolint(DOCKERFILE)
    assert code == 0, output


def test_hadolint_fails_on_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        DOCKERFILE.read_text() + "\nFROM debian:latest AS broken\nRUN cd /tmp && apt-get install curl\n"
    )
    code, output = hadolint(broken)
    assert code != 0
    for rule in ("DL3007", "DL3003", "DL3008", "DL3014", "DL3015"):  # latest, cd, unpinned, no -y, recommends
        assert rule in output, output


def test_targets_and_default() -> None:
    names = list(stages())
    assert {"cpu", "gpu", "cpu-build", "gpu-build", "wheels"} <= set(names)
    assert names[-1] == "cpu", "the last stage is what a plain `docker build .` produces"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_runtime_stage(target: str) -> None:
    instructions = stages()[target]
    text = "\n".join(instructions)
    assert re.search(r"^USER 10001:10001$", text, re.M), "numeric non-root user (runAsNonRoot can check it)"
    assert re.search(r"^HEALTHCHECK .*CMD .*/livez", text, re.M)
    assert re.search(r"^ENTRYPOINT \[\"tiue\"\]$", text, re.M) and re.search(r'^CMD \["serve"\]$', text, re.M)
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    volume = next(line for line in instructions if line.startswith("VOLUME"))
    assert "/models" in volume and "/var/cache/tiue/engines" in volume
    assert "TIUE_HOST=0.0.0.0" in text and "TIUE_ENGINE_DIR=/var/cache/tiue/engines" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text, "the root filesystem is read-only in Kubernetes"
    assert re.search(rf"^COPY --from={target}-build /opt/venv /opt/venv$", text, re.M)
    assert "pip" not in text.split("COPY --from", 1)[1], "nothing is installed in the runtime stage"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_settings_are_ones_the_service_reads(target: str) -> None:
    """A TIUE_* variable the service does not read is ignored silently (the GPU image would run fp32)."""
    settings_module = pytest.importorskip("service.settings")
    env = dict(re.findall(r"\b(TIUE_[A-Z0-9_]+)=(\S+)", "\n".join(stages()[target])))
    fields = set(settings_module.Settings.model_fields)
    unknown = [key for key in env if key.removeprefix("TIUE_").lower() not in fields]
    assert not unknown, f"not Settings fields: {unknown}"
    settings_module.Settings(**{key.removeprefix("TIUE_").lower(): value for key, value in env.items()})


def test_base_images_and_torch_pin() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M)
    assert re.search(r"^ARG GPU_BASE_IMAGE=\S+", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS cpu$", text, re.M)
    assert re.search(r"^FROM \$\{GPU_BASE_IMAGE\} AS gpu$", text, re.M)
    pin = re.search(r'"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins torch"
    arg = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
    assert arg and pin.group(1) == f"torch=={arg.group(1)}", (
        "the image installs the torch that pyproject pins"
    )
    cpu_build = "\n".join(stages()["cpu-build"])
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu_build
    assert "[onnx]" in cpu_build
    assert "[tensorrt,onnx-gpu]" in "\n".join(stages()["gpu-build"]), "the CUDA provider on the GPU image"


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is excluded first"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "engine", "service"} <= allowed
    assert not allowed & {"tests", "k8s", ".git", "deploy", "bench"}
    # inside the allowed folders: training code, tests and build leftovers stay out too
    assert {"engine/distill", "**/tests", "**/build", "**/*.egg-info", "**/__pycache__"} <= set(lines)
    assert not allowed & {"distill", "docs"}


def test_cpu_venv_is_trimmed_then_proven() -> None:
    """The build stage drops torch's C++ tests and headers, test suites, pip; then imports what serves."""
    trim = stages()["cpu-build"][-1]
    for gone in ("torch/test", "torch/include", "-name tests", "uninstall --yes --quiet pip setuptools"):
        assert gone in trim, gone
    assert trim.index("uninstall") < trim.index("import torch"), "the imports run after the trim"
    assert "service.app" in trim and "tiue --help" in trim
