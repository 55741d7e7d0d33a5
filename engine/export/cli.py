"""`tiue export` and `tiue build-engines`: make the compiled artefacts ahead of time (a Kubernetes Job
or init container), into the folder the service then reads as its engine_dir.

The command line itself (flags, TIUE_* settings) is service.cli's; these are what it runs, given the
same EngineConfig the service would load with. Importing this module imports neither torch nor
diffusers: that waits for the call.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.export.profiles import Range

if TYPE_CHECKING:
    from engine.export.cache import Entry
    from engine.loading import Components

log = logging.getLogger(__name__)


def parse_batch(text: str) -> Range:
    """'MIN:OPT:MAX' -> Range; ValueError with the expected form otherwise."""
    return Range.parse(text)


def _load(config: EngineConfig) -> Components:
    from engine.loading import load_configured

    return load_configured(config)


def _report(entry: Entry, verb: str) -> None:
    files = ", ".join(f"{name} ({meta['bytes'] / 1e6:.1f} MB)" for name, meta in entry.files.items())
    scale = int(entry.info.get("dims", {}).get("vae_scale", 8))
    profiles = "; ".join(p.describe(scale) for p in entry.key.profiles)
    sys.stdout.write(f"{verb} {entry.path}\n  {files}\n  profiles: {profiles}\n")


def export_graphs(config: EngineConfig, out: Path, batch: Range | None, sizes: list[str] | None) -> int:
    from engine.errors import EngineError
    from engine.export.cache import ArtefactStore, config_hash
    from engine.export.onnx_export import export_onnx_entry
    from engine.export.profiles import ModelDims, profiles_from_specs

    try:
        components = _load(config)
        profiles = profiles_from_specs(
            sizes, batch, ModelDims.from_components(components), config.max_batch_size
        )
        model_hash = config_hash(components, config)
        entry = export_onnx_entry(ArtefactStore(out), components, config.precision, profiles, model_hash)
    except (EngineError, ValueError) as exc:
        sys.stderr.write(f"tiue export: {exc}\n")
        return 2 if isinstance(exc, ValueError) else 1
    _report(entry, "exported")
    return 0


def build_engines(config: EngineConfig, batch: Range | None, sizes: list[str] | None) -> int:
    """The artefacts `config.backend` loads, found in `config.engine_dir` or built there now."""
    import dataclasses

    from engine.errors import EngineError
    from engine.export.onnx_export import ensure_onnx
    from engine.export.profiles import ModelDims, profiles_from_specs
    from engine.export.tensorrt_build import ensure_tensorrt, tensorrt_target
    from engine.types import BackendName

    try:
        if config.backend is BackendName.TORCH:
            return _build_torch(config, batch, sizes)
        trt = config.backend is BackendName.TENSORRT
        target = tensorrt_target(config.device, build_without_gpu=True) if trt else None  # before any work
        components = _load(config)
        profiles = profiles_from_specs(
            sizes, batch, ModelDims.from_components(components), config.max_batch_size
        )
        building = dataclasses.replace(
            config, build_engines=True, max_batch_size=min(p.batch.max for p in profiles)
        )
        if target is None:
            entry = ensure_onnx(components, building, profiles=profiles)
        else:
            entry = ensure_tensorrt(components, building, *target, profiles=profiles)
    except (EngineError, ValueError) as exc:
        sys.stderr.write(f"tiue build-engines: {exc}\n")
        return 2 if isinstance(exc, ValueError) else 1
    _report(entry, "ready")
    return 0


def _build_torch(config: EngineConfig, batch: Range | None, sizes: list[str] | None) -> int:
    """AOTInductor packages for each bucket and size the server warms (engine.export.torch_aot): the
    server's own settings choose them, so that it finds them by the same key."""
    if batch is not None or sizes:
        raise ValueError(
            "the torch backend builds the batch sizes and image sizes the server warms: set "
            "--warm-batch-sizes/--max-batch-size and --warm-sizes (TIUE_*) as for `tiue serve`, not --batch/--sizes"
        )
    from engine.export import torch_aot

    entry = torch_aot.build(_load(config), config)
    files = sum(meta["bytes"] for meta in entry.files.values())
    sys.stdout.write(
        f"ready {entry.path}\n  {len(entry.files)} packages ({files / 1e6:.1f} MB): {', '.join(entry.files)}\n"
        f"  for {entry.key.compute_capability}, torch {dict(entry.key.libraries)['torch']}\n"
    )
    return 0
