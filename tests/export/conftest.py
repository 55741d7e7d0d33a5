"""Exported tiny models, made once per session through the real `tiue export` command."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.backends.torch_backend import TorchBackend
from engine.config import EngineConfig
from engine.pipeline import TiUEPipeline, load_pipeline
from engine.types import BackendName
from service.cli import main

# Exported for batch 1..4 tuned at 2 and 32..96 px (latent 4..12); tests run other batches and sizes.
EXPORT_ARGS = ["--batch", "1:2:4", "--sizes", "32:64:96"]
MAX_BATCH = 4


def cli(*argv: object) -> int:
    """Run `tiue export|build-engines ...`, the real command line."""
    return main([str(a) for a in argv])


@pytest.fixture(scope="session")
def tiue() -> Callable[..., int]:
    """The CLI entry point: tiue("export", "--model", ...) -> exit status."""
    return cli


@pytest.fixture(scope="session")
def export_args() -> list[str]:
    return list(EXPORT_ARGS)


def _ort_config(model: Path, engine_dir: Path, **kw: Any) -> EngineConfig:
    return EngineConfig(
        model_dir=model,
        backend=BackendName.ONNXRUNTIME,
        engine_dir=engine_dir,
        max_batch_size=MAX_BATCH,
        **kw,
    )


@pytest.fixture(scope="session")
def ort_config() -> Callable[..., EngineConfig]:
    """An onnxruntime EngineConfig for a model and engine folder; keywords override."""
    return _ort_config


@pytest.fixture(scope="session")
def engine_dir_any(tiny_model_dir_any: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 ONNX graphs of each tiny model shape, exported ahead of time as a deployment would."""
    out = tmp_path_factory.mktemp("engines")
    assert cli("export", "--model", tiny_model_dir_any, "--out", out, *EXPORT_ARGS) == 0
    return out


@pytest.fixture(scope="session")
def onnx_pipeline_any(tiny_model_dir_any: Path, engine_dir_any: Path) -> TiUEPipeline:
    return load_pipeline(_ort_config(tiny_model_dir_any, engine_dir_any))


@pytest.fixture(scope="session")
def torch_backend_any(onnx_pipeline_any: TiUEPipeline) -> TorchBackend:
    """The eager reference over the very same weights."""
    return TorchBackend(onnx_pipeline_any.components, EngineConfig(max_batch_size=MAX_BATCH))


@pytest.fixture(scope="session")
def fp16_engine_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp16 ONNX graphs of the SD1.5-shaped tiny model (the precision TensorRT serves in)."""
    out = tmp_path_factory.mktemp("engines-fp16")
    assert cli("export", "--model", tiny_model_dir, "--out", out, "--precision", "fp16", *EXPORT_ARGS) == 0
    return out
