"""Backends chosen by name from settings; each lives in its own module and is imported only when chosen.

Backends run what they are handed: which artefacts, found or built, is decided in loading
(engine.pipeline.create_backend, engine.export.artefacts), never here.
"""

from __future__ import annotations

import importlib
from typing import Any

from engine.backends.base import Artefacts, Backend
from engine.errors import BackendUnavailableError
from engine.types import BackendName

_MODULES = {
    BackendName.TORCH: ("engine.backends.torch_backend", "TorchBackend"),
    BackendName.ONNXRUNTIME: ("engine.backends.onnxruntime_backend", "OnnxRuntimeBackend"),
    BackendName.TENSORRT: ("engine.backends.tensorrt_backend", "TensorRTBackend"),
}


def backend_class(name: BackendName) -> Any:
    """The class of the backend called `name` (a `Backend`); BackendUnavailableError when its module
    cannot be imported here."""
    module_name, class_name = _MODULES[BackendName(name)]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {BackendName(name).value!r} cannot run here: {exc}") from exc
    return getattr(module, class_name)


__all__ = ["Artefacts", "Backend", "backend_class"]
