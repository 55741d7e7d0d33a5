"""TensorRT engines built from the ONNX graphs with the TensorRT Python API.

`tensorrt` is the production library (data-center GPUs). `tensorrt_rtx` (TensorRT for RTX) has a
near-identical builder API and builds without a GPU, which is how the test suite checks that our
graphs parse and build here; which library built an engine is part of its cache key, so one is never
loaded by the other.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from engine.backends.tensorrt_runtime import gpu_identity, import_tensorrt, is_rtx, library, make_logger
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError, EngineError
from engine.export.cache import (
    ArtefactKey,
    ArtefactStore,
    Entry,
    batch_acceptor,
    config_hash,
    engine_store,
    find_or_build,
    write_atomic,
)
from engine.export.contracts import ComponentContract, contracts_for
from engine.export.onnx_export import ensure_onnx, onnx_key
from engine.export.profiles import ModelDims, Profile, default_profiles
from engine.loading import Components
from engine.types import Precision

log = logging.getLogger(__name__)


class EngineBuildError(EngineError):
    """TensorRT could not parse a graph or build an engine from it."""


def tensorrt_target(
    device: str, *, build_without_gpu: bool = False
) -> tuple[ModuleType, tuple[str, str] | None]:
    """The TensorRT module and the GPU (compute capability, name) whose engines to load or build.

    Without a CUDA GPU only TensorRT-RTX can build (`build_without_gpu`: for no particular GPU, as
    the tests do); anything else is refused before any work, naming what to use instead."""
    trt = import_tensorrt()
    if torch.cuda.is_available():
        target = torch.device(device if device.startswith("cuda") else "cuda")
        return trt, gpu_identity(target)
    if build_without_gpu and is_rtx(trt):
        log.warning("no GPU: building TensorRT-RTX engines for no particular GPU")
        return trt, None
    raise BackendUnavailableError(
        "TensorRT engines load and build on the NVIDIA GPU they run on, and torch sees none here; "
        "use --backend onnxruntime or --backend torch on this machine"
    )


def tensorrt_key(onnx: ArtefactKey, trt: ModuleType, compute_capability: str | None) -> ArtefactKey:
    """An engine depends on everything its ONNX graphs do, plus the TensorRT build and the GPU."""
    return dataclasses.replace(
        onnx,
        kind="tensorrt",
        libraries=tuple(sorted((*onnx.libraries, library(trt)))),
        compute_capability=compute_capability,
    )


def build_engine(
    trt: ModuleType,
    onnx_path: Path,
    contract: ComponentContract,
    dims: ModelDims,
    profiles: tuple[Profile, ...],
    precision: Precision,
    timing_cache: bytes | None = None,
) -> tuple[bytes, bytes | None]:
    """Parse one graph and build its serialized engine, one optimization profile per range.

    Returns the plan and the updated timing cache (None for TensorRT-RTX, where the cache is a no-op).
    """
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision is Precision.FP16 and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT-RTX has no flag: its types come from the graph
    cache = None
    if not is_rtx(trt):
        cache = config.create_timing_cache(timing_cache or b"")
        if not config.set_timing_cache(cache, False):
            log.warning("TensorRT refused the stored timing cache; starting a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
    for profile in contract.distinct_profiles(profiles):
        opt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in contract.profile_shapes(dims, profile).items():
            opt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(opt_profile)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path.name}; its log says why")
    log.info("built the %s engine in %.1fs", contract.name, time.perf_counter() - started)
    new_cache = bytes(memoryview(config.get_timing_cache().serialize())) if cache is not None else None
    return bytes(memoryview(plan)), new_cache


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def build_tensorrt_entry(
    store: ArtefactStore,
    components: Components,
    onnx_entry: Entry,
    precision: Precision,
    profiles: tuple[Profile, ...],
    trt: ModuleType,
    gpu: tuple[str, str] | None,
) -> Entry:
    """Build the three engines into a new cache entry (or return the one an identical key has),
    reusing and updating the timing cache.

    `gpu` is (compute capability, name) of the target GPU; None only for TensorRT-RTX builds without
    one (tests), whose engines are compiled for the GPU when first loaded.
    """
    dims = ModelDims.from_components(components)
    for p in profiles:
        dims.check(p)
    onnx_want = dataclasses.replace(onnx_entry.key, profiles=profiles)
    key = tensorrt_key(onnx_want, trt, gpu[0] if gpu else None)
    existing = store.exact(key)
    if existing is not None:
        log.info("engines for this key are already built: %s", existing.path)
        return existing
    lib, version = library(trt)
    timing_path = store.root / "timing" / f"{lib}-{version}-{_slug(gpu[1]) if gpu else 'nogpu'}.cache"

    def write(tmp: Path) -> Iterator[tuple[str, Path]]:
        cache = timing_path.read_bytes() if timing_path.is_file() else None
        for contract in contracts_for(components).values():
            plan, cache = build_engine(
                trt, onnx_entry.file(contract.name), contract, dims, profiles, precision, cache
            )
            path = tmp / f"{contract.name}.plan"
            path.write_bytes(plan)
            yield contract.name, path
        if cache:
            write_atomic(timing_path, cache)

    info = {
        "model_name": components.name,
        "model_path": str(components.path),
        "onnx_entry": onnx_entry.path.name,
        "dims": dataclasses.asdict(dims),
        "gpu": gpu[1] if gpu else None,
        "timing_cache": str(timing_path) if not is_rtx(trt) else None,
    }
    return store.create(key, write, info)


def tensorrt_want(
    components: Components,
    config: EngineConfig,
    trt: ModuleType,
    compute_capability: str | None,
    model_hash: str,
    profiles: tuple[Profile, ...] | None = None,
) -> tuple[ArtefactKey, tuple[Profile, ...]]:
    profiles = profiles or default_profiles(ModelDims.from_components(components), config.max_batch_size)
    onnx = onnx_key(model_hash, components.chain.steps, config.precision, profiles)
    return tensorrt_key(onnx, trt, compute_capability), profiles


def ensure_tensorrt(
    components: Components,
    config: EngineConfig,
    trt: ModuleType,
    gpu: tuple[str, str] | None,
    profiles: tuple[Profile, ...] | None = None,
) -> Entry:
    """The engines for this model, precision, TensorRT and GPU (and `profiles`, default: sized from
    max_batch_size): cached, built now if `config.build_engines`, or an error naming what the cached
    ones were built for."""
    store = engine_store(config)
    model_hash = config_hash(components, config)
    want, profiles = tensorrt_want(components, config, trt, gpu[0] if gpu else None, model_hash, profiles)

    def build() -> Entry:
        building = dataclasses.replace(config, build_engines=True)
        onnx_entry = ensure_onnx(components, building, model_hash, profiles)
        return build_tensorrt_entry(store, components, onnx_entry, config.precision, profiles, trt, gpu)

    hint = (
        f"Build them ahead of time on a machine with this GPU and TensorRT with `tiue build-engines --model "
        f"{components.path} --engine-dir {store.root} --precision {config.precision.value} "
        f"--batch {profiles[0].batch}`, or pass --build-engines (TIUE_BUILD_ENGINES=true) to build at load."
    )
    return find_or_build(
        store, want, batch_acceptor(config.max_batch_size), build if config.build_engines else None, hint
    )
