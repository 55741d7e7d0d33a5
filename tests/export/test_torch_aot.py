"""The torch backend's built artefacts (engine.export.torch_aot): `tiue build-engines --backend torch`
writes AOTInductor packages per stage and bucket, a fresh pipeline loads them and compiles nothing, and
packages built for another torch or device are refused with the reason logged, never a crash.

Inductor compiles C++ on this CPU (about 15 s a package): the build runs once per module, in a
subprocess, as the Kubernetes Job runs it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo.utils

from engine import EngineConfig, GenerationRequest
from engine.export import torch_aot
from engine.loading import load_configured
from engine.pipeline import TiUEPipeline, load_pipeline
from engine.types import TorchCompile

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["text_encoder-b1", "text_encoder-b2", "denoiser-b1-8x8", "denoiser-b2-8x8"]
PACKAGES += ["vae_decoder-b1-8x8", "vae_decoder-b2-8x8"]


def _config(model: Path, engines: Path, mode: TorchCompile = TorchCompile.AOT, **kw: object) -> EngineConfig:
    return EngineConfig(model, engine_dir=engines, torch_compile=mode, max_batch_size=2, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def built(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Packages for buckets 1 and 2 at the native 64 px, built by the CLI in its own process."""
    engines = tmp_path_factory.mktemp("engines")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TIUE_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "from service.cli import main; raise SystemExit(main())", "build-engines"]
        + ["--backend", "torch", "--model", str(tiny_model_dir), "--engine-dir", str(engines)]
        + ["--max-batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return engines, done.stdout


def _entry_dir(engines: Path) -> Path:
    (entry,) = [p for p in engines.glob(f"{torch_aot.KIND}-*") if p.is_dir()]
    return entry


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _spy(pipe: TiUEPipeline) -> list[str]:
    calls: list[str] = []
    packages = pipe.backend.packages  # type: ignore[attr-defined]
    for key, fn in list(packages.items()):

        def counted(
            *args: torch.Tensor, _fn: Callable[..., torch.Tensor] = fn, _stage: str = key[0]
        ) -> torch.Tensor:
            calls.append(_stage)
            return _fn(*args)

        packages[key] = counted
    return calls


@pytest.mark.slow
def test_build_engines_writes_a_package_per_stage_and_bucket(built: tuple[Path, str]) -> None:
    engines, stdout = built
    manifest = json.loads((_entry_dir(engines) / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(PACKAGES)
    key = manifest["key"]
    assert key["kind"] == "torch-aoti" and key["libraries"]["torch"] == torch.__version__
    assert key["compute_capability"] == torch_aot.device_target(torch.device("cpu"))
    assert "ready" in stdout and "6 packages" in stdout
    assert all((_entry_dir(engines) / f"{name}.pt2").is_file() for name in PACKAGES)


@pytest.mark.slow
def test_a_fresh_pipeline_loads_them_and_compiles_nothing(
    tiny_model_dir: Path, built: tuple[Path, str]
) -> None:
    engines, _ = built
    before = _graphs()
    pipe = load_pipeline(_config(tiny_model_dir, engines))
    assert pipe.config.torch_compile is TorchCompile.AOT and len(pipe.backend.packages) == 6  # type: ignore[attr-defined]
    pipe.warmup()
    calls = _spy(pipe)
    requests = [GenerationRequest(f"a red circle {s}", s, 64, 64) for s in (3, 4, 5)]
    got = [im.pixels for r in (requests[:2], requests[2:]) for im in pipe.generate(r).images]
    assert _graphs() == before, "loading the packages must not run torch.compile"
    assert calls == ["text_encoder", "denoiser", "vae_decoder"] * 2  # a batch of 2, then one of 1
    eager = load_pipeline(_config(tiny_model_dir, engines, TorchCompile.OFF, prompt_cache_size=0))
    want = [im.pixels for r in (requests[:2], requests[2:]) for im in eager.generate(r).images]
    for g, w in zip(got, want, strict=True):
        assert np.abs(g.astype(int) - w.astype(int)).max() <= 1


def _tamper(engines: Path, target: Path, change: Callable[[dict[str, object]], None]) -> Path:
    shutil.copytree(_entry_dir(engines), target / _entry_dir(engines).name)
    manifest_path = target / _entry_dir(engines).name / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    change(manifest["key"])
    manifest_path.write_text(json.dumps(manifest))
    return target


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            lambda key: key["libraries"].update(torch="2.11.0+cu130"),
            f"torch 2.11.0+cu130 (want {torch.__version__})",
        ),
        (
            lambda key: key.update(compute_capability="NVIDIA H200 sm_90"),
            "compute capability NVIDIA H200 sm_90",
        ),
    ],
)
def test_packages_for_another_torch_or_device_are_refused_with_the_reason(
    tiny_model_dir: Path,
    built: tuple[Path, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: Callable[[dict[str, object]], None],
    reason: str,
) -> None:
    engines = _tamper(built[0], tmp_path, change)
    with caplog.at_level(logging.INFO, logger="engine.export.torch_aot"):
        pipe = load_pipeline(_config(tiny_model_dir, engines))
    (line,) = [r for r in caplog.records if "no usable torch AOTInductor packages" in r.getMessage()]
    assert reason in line.getMessage() and line.levelno == logging.WARNING
    assert pipe.config.torch_compile is TorchCompile.OFF  # aot on the CPU falls back as auto: off
    assert pipe.generate([GenerationRequest("a red circle", 1, 64, 64)]).images[0].pixels.std() > 0


@pytest.mark.slow
def test_a_package_that_does_not_load_falls_back(
    tiny_model_dir: Path, built: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engines = _tamper(built[0], tmp_path, lambda key: None)
    damaged = _entry_dir(engines) / "denoiser-b2-8x8.pt2"
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # the size the manifest says, not a package
    with caplog.at_level(logging.WARNING, logger="engine.export.torch_aot"):
        pipe = load_pipeline(_config(tiny_model_dir, engines))
    (line,) = [r.getMessage() for r in caplog.records if "no usable torch AOTInductor" in r.getMessage()]
    assert "denoiser-b2-8x8 did not load" in line
    assert pipe.config.torch_compile is TorchCompile.OFF and not pipe.backend.packages  # type: ignore[attr-defined]


@pytest.mark.slow
def test_packages_that_miss_a_warmed_size_are_refused(tiny_model_dir: Path, built: tuple[Path, str]) -> None:
    config = _config(tiny_model_dir, built[0], warm_sizes=((32, 32),))
    resolved = torch_aot.resolve(load_configured(config), config)
    assert resolved.torch_compile is TorchCompile.OFF
    entry, _, why = torch_aot.find(load_configured(config), config)
    assert entry is None and "holds no denoiser-b1-4x4" in why


def test_without_packages_aot_falls_back_and_auto_on_the_cpu_does_not_look(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="engine.export.torch_aot"):
        aot = load_pipeline(_config(tiny_model_dir, tmp_path))
        auto = load_pipeline(_config(tiny_model_dir, tmp_path, TorchCompile.AUTO))
    assert aot.config.torch_compile is TorchCompile.OFF and auto.config.torch_compile is TorchCompile.AUTO
    assert not auto.config.compiles
    (line,) = [r.getMessage() for r in caplog.records if "AOTInductor" in r.getMessage()]
    assert f"there are none in {tmp_path}" in line and "torch_compile off instead" in line


def test_build_engines_for_torch_refuses_tensorrt_profiles(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    code = main(["build-engines", "--backend", "torch", "--model", str(tiny_model_dir), "--batch", "1:2:4"])
    assert code == 2 and "--warm-batch-sizes" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs around the packages need a GPU")
def test_on_cuda_packages_are_captured_and_replayed(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = EngineConfig(
        tiny_model_dir, device="cuda", engine_dir=tmp_path, torch_compile=TorchCompile.AOT, max_batch_size=2
    )
    torch_aot.build(load_configured(config), config)
    pipe = load_pipeline(config)
    assert pipe.config.torch_compile is TorchCompile.AOT
    pipe.warmup()
    graphs = list(pipe.backend.packages.values())  # type: ignore[attr-defined]
    assert all(g.graph is not None for g in graphs), "every warmed package is captured"
    requests = [GenerationRequest(f"a red circle {s}", s, 64, 64) for s in (1, 2)]
    eager = load_pipeline(EngineConfig(tiny_model_dir, device="cuda", torch_compile=TorchCompile.OFF))
    for got, want in zip(pipe.generate(requests).images, eager.generate(requests).images, strict=True):
        assert np.abs(got.pixels.astype(int) - want.pixels.astype(int)).max() <= 1
