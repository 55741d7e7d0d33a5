"""What a backend runs, decided once at load: the compiled artefacts from the cache, built now when the
config says so, or refused with every mismatch named. Backends receive the result; they never build."""

from __future__ import annotations

from pathlib import Path

from engine.config import EngineConfig
from engine.errors import BackendUnavailableError
from engine.export.cache import Entry
from engine.export.contracts import ComponentContract, contracts_for
from engine.loading import Components
from engine.types import BackendName, TorchCompile


def backend_artefacts(components: Components, config: EngineConfig) -> Entry | None:
    """The cache entry a compiled backend runs; for torch its AOTInductor packages when the config runs
    them (torch_compile aot, as engine.export.torch_aot.resolve leaves it when they are found), else None."""
    if config.backend is BackendName.TORCH:
        if config.torch_compile is not TorchCompile.AOT:
            return None
        from engine.export import torch_aot

        entry, _, why = torch_aot.find(components, config)
        if entry is None:
            raise BackendUnavailableError(
                f"no usable torch AOTInductor packages: {why}. Build them with `tiue build-engines "
                "--backend torch` and the server's settings, or set TIUE_TORCH_COMPILE=auto"
            )
        return entry
    from engine.export.onnx_export import ensure_onnx

    if config.backend is BackendName.ONNXRUNTIME:
        return ensure_onnx(components, config)
    from engine.export.tensorrt_build import ensure_tensorrt, tensorrt_target

    trt, gpu = tensorrt_target(config.device)
    return ensure_tensorrt(components, config, trt, gpu)


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
