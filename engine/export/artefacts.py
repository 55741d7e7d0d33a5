"""What a backend runs, decided once at load: the compiled artefacts from the cache, built now when the
config says so, or refused with every mismatch named. Backends receive the result; they never build."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.export.cache import Entry
from engine.loading import Components
from engine.types import BackendName


def backend_artefacts(components: Components, config: EngineConfig) -> Entry | None:
    """None for torch (it runs the modules themselves); the cache entry for a compiled backend."""
    if config.backend is BackendName.TORCH:
        return None
    from engine.export.onnx_export import ensure_onnx

    if config.backend is BackendName.ONNXRUNTIME:
        return ensure_onnx(components, config)
    from engine.export.tensorrt_build import ensure_tensorrt, tensorrt_target

    trt, gpu = tensorrt_target(config.device)
    return ensure_tensorrt(components, config, trt, gpu)
