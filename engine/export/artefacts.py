"""What a backend runs, decided once at load: the compiled artefacts from the cache, built now when the
config says so, or refused with every mismatch named. Backends receive the result; they never build."""

from __future__ import annotations

from pathlib import Path

from engine.backends.base import Artefacts
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError
from engine.export.cache import Entry
from engine.export.contracts import ComponentContract, contracts_for
from engine.loading import Components
from engine.types import BackendName


def backend_artefacts(components: Components, config: EngineConfig) -> Artefacts | None:
    """None for torch (it runs the modules themselves); the graphs of the cache entry a compiled
    backend runs."""
    if config.backend is BackendName.TORCH:
        return None
    from engine.export.onnx_export import ensure_onnx

    if config.backend is BackendName.ONNXRUNTIME:
        entry = ensure_onnx(components, config)
    else:
        from engine.export.tensorrt_build import ensure_tensorrt, tensorrt_target

        trt, gpu = tensorrt_target(config.device)
        entry = ensure_tensorrt(components, config, trt, gpu)
    return Artefacts(entry.path, entry.key.profiles, artefact_files(entry, components))


def artefact_files(entry: Entry, components: Components) -> dict[str, tuple[ComponentContract, Path]]:
    """Each graph this model runs (the tiny decoder's too, when it has one) and its file in `entry`."""
    contracts = contracts_for(components)
    missing = [name for name in contracts if name not in entry.files]
    if missing:
        raise BackendUnavailableError(
            f"the compiled artefacts in {entry.path} hold no {', '.join(missing)}; export them again "
            "(`tiue export`, or --build-engines) for this model"
        )
    return {name: (c, entry.file(name)) for name, c in contracts.items()}
