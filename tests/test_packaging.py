"""The wheel holds only what serves: engine/, service/ (with the playground's page) and the embedded model;
no training code, judge, test helpers or tests. And nothing on the serving import path reaches for them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVED = ("engine", "service")
# what a checkout holds besides its sources: never part of a build
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "runs", "out", "cache"
)


def _sources(package: str) -> set[str]:
    """The checkout's files of a served package that belong in the wheel: modules, the model, the page."""
    folder = ROOT / package
    found = {p for p in folder.rglob("*.py") if "__pycache__" not in p.parts}
    for data in ("default_model", "static"):
        found |= {p for p in (folder / data).rglob("*") if p.is_file()}
    return {p.relative_to(ROOT).as_posix() for p in found}


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Build from a copy of the checkout, so a stale build/ folder cannot leak files in."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = shutil.copytree(ROOT, tmp / "src", ignore=NOT_SOURCES)
    command = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*command, "-q", "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n(needs setuptools: pip install -e '.[dev]')"
    (wheel,) = (tmp / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_the_wheel_holds_the_served_packages_and_the_model(wheel_files: list[str]) -> None:
    for package in SERVED:
        missing = _sources(package) - set(wheel_files)
        assert not missing, f"left out of the wheel: {sorted(missing)}"
    assert "engine/default_model/model_index.json" in wheel_files
    assert {f"service/static/playground.{kind}" for kind in ("html", "css", "js")} <= set(wheel_files)


def test_the_wheel_holds_nothing_else(wheel_files: list[str]) -> None:
    tops = {name.split("/")[0] for name in wheel_files}
    assert {t for t in tops if not t.endswith(".dist-info")} == set(SERVED)
    stray = [n for n in wheel_files if "judge" in n or "tiny_model" in n or "/tests/" in n or "distill/" in n]
    assert not stray, stray


@pytest.mark.slow  # a fresh interpreter importing torch, diffusers and FastAPI
def test_serving_imports_no_training_or_test_code() -> None:
    modules = "service.app, service.cli, engine.pipeline, engine.loading, engine.export.cli"
    code = f"import json, sys, {modules}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not {"distill", "tests", "bench"} & set(json.loads(result.stdout)), result.stdout
