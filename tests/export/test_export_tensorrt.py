"""The TensorRT path as far as a machine without a GPU allows: our graphs parse and build into engines
(with TensorRT-RTX, which builds on the CPU), engines are keyed by library and GPU, and the backend
fails clearly where it cannot run."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from engine.config import EngineConfig
from engine.errors import BackendUnavailableError
from engine.export.cache import ArtefactStore
from engine.export.tensorrt_build import ensure_tensorrt, tensorrt_want
from engine.files import model_content_hash
from engine.loading import load_components
from engine.pipeline import create_backend
from engine.types import BackendName, Precision

HAVE_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="neither tensorrt nor tensorrt_rtx is installed")


def _fake_trt(name: str = "tensorrt", version: str = "10.9.0") -> ModuleType:
    """Enough of a TensorRT module for the cache key: its name and version."""
    module = ModuleType(name)
    module.__version__ = version  # type: ignore[attr-defined]
    return module


def _plans(tmp: Path) -> Iterator[tuple[str, Path]]:
    for name in ("text_encoder", "denoiser", "vae_decoder"):
        (tmp / f"{name}.plan").write_bytes(b"not a real plan")
        yield name, tmp / f"{name}.plan"


@pytest.mark.slow  # a real TensorRT-RTX build, ~10 s
@needs_trt
def test_exported_graphs_build_into_engines(
    tiny_model_dir: Path, fp16_engine_dir: Path, tiue: Callable[..., int], export_args: list[str]
) -> None:
    args = (
        "--backend",
        "tensorrt",
        "--model",
        tiny_model_dir,
        "--engine-dir",
        fp16_engine_dir,
        "--precision",
        "fp16",
        "--device",
        "cpu",
    )
    assert tiue("build-engines", *args, *export_args) == 0
    store = ArtefactStore(fp16_engine_dir)
    (onnx_entry,) = store.entries("onnx")  # the graphs exported earlier were reused, not exported again
    (entry,) = store.entries("tensorrt")
    assert entry.problems() == []
    assert entry.info["onnx_entry"] == onnx_entry.path.name
    assert {name: entry.file(name).stat().st_size > 100_000 for name in entry.files} == {
        "text_encoder": True,
        "denoiser": True,
        "vae_decoder": True,
    }
    mtime = entry.file("denoiser").stat().st_mtime_ns
    assert tiue("build-engines", *args, *export_args) == 0, "a second run is a cache hit"
    assert entry.file("denoiser").stat().st_mtime_ns == mtime and len(store.entries("tensorrt")) == 1
    libraries = dict(entry.key.libraries)
    assert ("tensorrt" in libraries) or ("tensorrt_rtx" in libraries)
    assert entry.key.profiles == onnx_entry.key.profiles and entry.key.precision == "fp16"


@needs_trt
def test_the_backend_needs_a_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    components = load_components(tiny_model_dir, torch.float16, "cpu", 4)
    config = EngineConfig(
        model_dir=tiny_model_dir,
        backend=BackendName.TENSORRT,
        device="cuda",
        engine_dir=tmp_path,
        build_engines=True,
    )
    with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU"):
        create_backend(components, config)
    assert not any(tmp_path.iterdir()), "nothing is built when the backend cannot run"


def test_without_tensorrt_the_backend_says_how_to_install_it(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    components = load_components(tiny_model_dir, torch.float16, "cpu", 4)
    config = EngineConfig(model_dir=tiny_model_dir, backend=BackendName.TENSORRT, device="cuda")
    with pytest.raises(BackendUnavailableError, match=r"tiue-serve\[tensorrt\]"):
        create_backend(components, config)


def test_engines_for_another_gpu_or_tensorrt_are_refused_by_name(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    components = load_components(tiny_model_dir, torch.float16, "cpu", 4)
    config = EngineConfig(
        model_dir=tiny_model_dir, backend=BackendName.TENSORRT, precision=Precision.FP16, engine_dir=tmp_path
    )
    trt, h100 = _fake_trt(), ("sm_90", "NVIDIA H100 80GB HBM3")
    want, _ = tensorrt_want(components, config, trt, "sm_90", model_content_hash(components.path))
    store = ArtefactStore(tmp_path)
    store.create(dataclasses.replace(want, compute_capability="sm_80"), _plans, {})
    with pytest.raises(BackendUnavailableError) as info:
        ensure_tensorrt(components, config, trt, h100)
    message = str(info.value)
    assert "compute capability sm_80 (want sm_90)" in message and "tiue build-engines" in message
    with pytest.raises(BackendUnavailableError, match=r"tensorrt 10.9.0 \(want 10.10.0\)"):
        ensure_tensorrt(components, config, _fake_trt(version="10.10.0"), ("sm_80", "NVIDIA A100"))
    with pytest.raises(BackendUnavailableError, match=r"tensorrt_rtx 1.7 \(want absent\)"):
        rtx_key, _ = tensorrt_want(
            components, config, _fake_trt("tensorrt_rtx", "1.7"), "sm_90", want.model_hash
        )
        store.create(rtx_key, _plans, {})
        ensure_tensorrt(components, config, trt, h100)
    store.create(want, _plans, {})
    assert ensure_tensorrt(components, config, trt, h100).key == want
