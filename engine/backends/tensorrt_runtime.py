"""What running TensorRT engines needs, and building them too: the TensorRT module (`tensorrt`, else
`tensorrt_rtx`), its identity, the GPU's, and a logger into Python logging. Runtime-side, so that the
backend never imports the builder (engine.export.tensorrt_build imports these)."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch

from engine.errors import BackendUnavailableError

log = logging.getLogger(__name__)

TRT_MODULES = ("tensorrt", "tensorrt_rtx")


def import_tensorrt(allow_rtx: bool = True) -> ModuleType:
    """`tensorrt`, else (when allowed) `tensorrt_rtx`; a clear error when neither is installed."""
    import importlib

    names = TRT_MODULES if allow_rtx else TRT_MODULES[:1]
    errors = []
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise BackendUnavailableError(
        "TensorRT is not installed (pip install 'tiue-serve[tensorrt]' on a machine with an NVIDIA GPU): "
        + "; ".join(errors)
    )


def library(trt: ModuleType) -> tuple[str, str]:
    return trt.__name__, str(trt.__version__)


def is_rtx(trt: ModuleType) -> bool:
    return trt.__name__ == "tensorrt_rtx"


def gpu_identity(device: torch.device | str = "cuda") -> tuple[str, str]:
    """(compute capability as 'sm_XY', the GPU's name) of a CUDA device."""
    device = torch.device(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}", torch.cuda.get_device_name(device)


def make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that writes to Python logging instead of stderr."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

    return _Logger()
