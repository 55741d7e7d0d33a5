"""Backends chosen by name from settings; each lives in its own module and is imported only when chosen."""

from __future__ import annotations

import importlib

from engine.backends.base import Backend
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError
from engine.loading import Components
from engine.types import BackendName

_MODULES = {
    BackendName.TORCH: ("engine.backends.torch_backend", "TorchBackend"),
    BackendName.ONNXRUNTIME: ("engine.backends.onnxruntime_backend", "OnnxRuntimeBackend"),
    BackendName.TENSORRT: ("engine.backends.tensorrt_backend", "TensorRTBackend"),
}


def create_backend(components: Components, config: EngineConfig) -> Backend:
    module_name, class_name = _MODULES[BackendName(config.backend)]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {config.backend.value!r} cannot run here: {exc}") from exc
    backend: Backend = getattr(module, class_name)(components, config)
    return backend


__all__ = ["Backend", "create_backend"]
