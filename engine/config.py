"""How to build a pipeline: which model, which backend, on what device, in what precision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.types import BackendName, Precision


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path | None = None  # None: the embedded default model
    backend: BackendName = BackendName.TORCH
    device: str = "cpu"
    precision: Precision = Precision.FP32
    steps: int = 4
    engine_dir: Path | None = None  # cache of compiled artefacts (ONNX graphs, TensorRT engines)
    build_engines: bool = False  # compiled backends: build a missing engine at load instead of failing
    torch_compile: bool = False
    max_batch_size: int = 8  # images per denoiser call; compiled profiles are sized from it
    threads: int = 0  # CPU intra-op threads for torch and onnxruntime; 0 keeps the library default
