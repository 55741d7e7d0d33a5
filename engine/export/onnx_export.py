"""ONNX export of the three components, each as its contract declares it.

The TorchScript exporter (``dynamo=False``, opset 18) is used on purpose: it exports the whole TiUE
denoiser in seconds and the graph runs at any batch and size, where the dynamo exporter took 49 s
on the tiny model and its graph failed at run time for batches other than the export batch (an
``Expand`` of the timestep embedding to a symbolic batch). See docs/backends.md.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.errors import BackendUnavailableError
from engine.export.cache import (
    ArtefactKey,
    ArtefactStore,
    Entry,
    batch_acceptor,
    components_hash,
    config_hash,
    engine_store,
    find_or_build,
)
from engine.export.contracts import EXPORT_PRECISIONS, ComponentContract, contracts_for
from engine.export.profiles import ModelDims, Profile, default_profiles
from engine.loading import Components
from engine.types import Precision

log = logging.getLogger(__name__)

OPSET = 18
EXPORTER = f"torchscript-opset{OPSET}"


def torch_version() -> str:
    """torch's release without the build tag: a CPU and a CUDA build export the same graph."""
    return torch.__version__.split("+")[0]


def onnx_key(model_hash: str, steps: int, precision: Precision, profiles: tuple[Profile, ...]) -> ArtefactKey:
    return ArtefactKey(
        kind="onnx",
        model_hash=model_hash,
        steps=steps,
        precision=precision.value,
        profiles=profiles,
        exporter=EXPORTER,
        libraries=(("torch", torch_version()),),
    )


def check_precision(precision: Precision) -> None:
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(
            f"precision {precision.value} cannot be exported; choose one of "
            f"{', '.join(p.value for p in EXPORT_PRECISIONS)}"
        )


def export_component(
    contract: ComponentContract,
    components: Components,
    precision: Precision,
    profiles: tuple[Profile, ...],
    out_dir: Path,
) -> list[Path]:
    """Write `<name>.onnx` (and `<name>.onnx.data` for graphs over protobuf's 2 GB) into `out_dir`."""
    import onnx  # an optional dependency: only export needs it

    dims = ModelDims.from_components(components)
    device = next(components.unet.parameters()).device
    module = contract.build_module(components, precision).eval()
    sample = contract.sample_inputs(dims, profiles[0], precision, device)
    work = out_dir / f".{contract.name}"
    work.mkdir(parents=True)
    path = work / contract.filename
    started = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about Python scalars the graph does not depend on
        torch.onnx.export(
            module,
            sample,
            str(path),
            input_names=contract.input_names,
            output_names=contract.output_names,
            dynamic_axes=contract.dynamic_axes(),  # type: ignore[arg-type]
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    _consolidate_external_data(path)
    onnx.checker.check_model(str(path))
    written = []
    for f in sorted(work.iterdir()):
        written.append(out_dir / f.name)
        f.replace(out_dir / f.name)
    shutil.rmtree(work)
    log.info("exported %s in %.1fs (%s)", contract.name, time.perf_counter() - started, precision.value)
    return written


def _consolidate_external_data(path: Path) -> None:
    """A graph over 2 GB comes out of the exporter as one file per weight; gather them into one."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    if not any(uses_external_data(t) for t in model.graph.initializer):
        return
    model = onnx.load(str(path))
    for f in path.parent.iterdir():
        if f != path:
            f.unlink()
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
    )


def export_all(
    components: Components, precision: Precision, profiles: tuple[Profile, ...], out_dir: Path
) -> Iterator[tuple[str, Path]]:
    """(artefact name, path) for every file of the model's graphs: 'denoiser', 'denoiser.data', ..."""
    check_precision(precision)
    for contract in contracts_for(components).values():
        for path in export_component(contract, components, precision, profiles, out_dir):
            yield (contract.name if path.suffix == ".onnx" else f"{contract.name}.data"), path


def export_onnx_entry(
    store: ArtefactStore,
    components: Components,
    precision: Precision,
    profiles: tuple[Profile, ...],
    model_hash: str | None = None,
) -> Entry:
    """Export the three graphs into a new cache entry (or return the one an identical key has)."""
    check_precision(precision)
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            "exporting ONNX graphs needs the onnx package: pip install 'tiue-serve[onnx]'"
        ) from exc
    dims = ModelDims.from_components(components)
    for p in profiles:
        dims.check(p)
    key = onnx_key(model_hash or components_hash(components), components.chain.steps, precision, profiles)
    existing = store.exact(key)
    if existing is not None:
        return existing
    info = {
        "model_name": components.name,
        "model_path": str(components.path),
        "dims": dataclasses.asdict(dims),
    }
    return store.create(key, lambda tmp: export_all(components, precision, profiles, tmp), info)


def ensure_onnx(
    components: Components,
    config: EngineConfig,
    model_hash: str | None = None,
    profiles: tuple[Profile, ...] | None = None,
) -> Entry:
    """The ONNX graphs for this model and precision (and `profiles`, default: sized from
    max_batch_size): from the cache, exported now if `config.build_engines`, or an error that says
    what is there and how to make what is missing."""
    if config.precision not in EXPORT_PRECISIONS:
        raise BackendUnavailableError(
            f"compiled backends run in fp32 or fp16, not {config.precision.value}; pass --precision fp16 or fp32"
        )
    store = engine_store(config)
    model_hash = model_hash or config_hash(components, config)
    profiles = profiles or default_profiles(ModelDims.from_components(components), config.max_batch_size)
    want = onnx_key(model_hash, components.chain.steps, config.precision, profiles)

    def build() -> Entry:
        return export_onnx_entry(store, components, config.precision, profiles, model_hash)

    hint = (
        f"Export them ahead of time with `tiue export --model {components.path} --out {store.root} "
        f"--precision {config.precision.value} --batch {profiles[0].batch}`, or pass --build-engines "
        "(TIUE_BUILD_ENGINES=true) to export at load."
    )
    return find_or_build(
        store, want, batch_acceptor(config.max_batch_size), build if config.build_engines else None, hint
    )
