"""Backends chosen by name from settings; each lives in its own module and is imported only when chosen."""

from __future__ import annotations

import importlib

from engine.backends.base import Backend
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError
from engine.export.artefacts import backend_artefacts
from engine.loading import Components
from engine.types import BackendName

_MODULES = {
    BackendName.TORCH: ("engine.backends.torch_backend", "TorchBackend"),
    BackendName.ONNXRUNTIME: ("engine.backends.onnxruntime_backend", "OnnxRuntimeBackend"),
    BackendName.TENSORRT: ("engine.backends.tensorrt_backend", "TensorRTBackend"),
}


def create_backend(components: Components, config: EngineConfig) -> Backend:
    """The backend named by the config, handed the artefacts it runs (engine.export.artefacts)."""
    module_name, class_name = _MODULES[BackendName(config.backend)]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {config.backend.value!r} cannot run here: {exc}") from exc
    backend_class = getattr(module, class_name)
    backend_class.check_runnable(config)  # e.g. no GPU: refused before anything is looked up or built
    backend: Backend = backend_class(components, config, backend_artefacts(components, config))
    return backend


__all__ = ["Backend", "create_backend"]
