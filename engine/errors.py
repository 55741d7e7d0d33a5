"""Domain errors raised by the engine; the service maps them to HTTP statuses in one place."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""


class ModelLoadError(EngineError):
    """The model folder is missing, incomplete or not a TiUE-compatible diffusers pipeline."""


class UnsupportedSchedulerError(ModelLoadError):
    """The checkpoint's scheduler cannot be folded into closed form and the step loop is disabled."""


class InvalidRequestError(EngineError, ValueError):
    """A generation request the model cannot serve (size, prompt); the caller's fault, never the device's.
    `param` names the request field at fault, when one is."""

    param: str | None = None


class UnsupportedSizeError(InvalidRequestError):
    """Width or height is not a size the UNet supports (multiple of its spatial factor, within bounds)."""

    param = "size"


class UnsupportedDecoderError(InvalidRequestError):
    """A decoder this model has not loaded."""

    param = "decoder"


class BackendUnavailableError(EngineError):
    """The selected backend cannot run here (package missing, no GPU, engine built for another device)."""
