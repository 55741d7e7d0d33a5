"""TiUE engine: loading, the one-pass denoiser, backends and the image pipeline. Knows nothing of HTTP."""

from engine.config import EngineConfig
from engine.types import (
    BackendName,
    BatchResult,
    Decoder,
    GeneratedImage,
    GenerationRequest,
    ModelInfo,
    Precision,
)


def load_pipeline(config: EngineConfig):  # type: ignore[no-untyped-def]
    """Lazy re-export so `import engine` stays cheap."""
    from engine.pipeline import load_pipeline as _load

    return _load(config)


__all__ = [
    "BackendName",
    "BatchResult",
    "Decoder",
    "EngineConfig",
    "GeneratedImage",
    "GenerationRequest",
    "ModelInfo",
    "Precision",
    "load_pipeline",
]
