"""Torch AOTInductor packages at run time: which the server warms, and loading them onto the loaded
model's own weights. Runtime-side, so that the torch backend never imports the builder
(engine.export.torch_aot, which builds and finds them, imports these)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.backends.base import Artefacts
from engine.backends.cuda_graphs import GraphedCallable
from engine.backends.torch_modules import StageModules
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError
from engine.export.contracts import DECODER_CONTRACTS, DENOISER, TEXT_ENCODER
from engine.export.profiles import ModelDims
from engine.loading import Components
from engine.types import Decoder, TorchCompile

ShapeKey = tuple[str, tuple[int, ...]]  # (stage, shape of its first input)


@dataclasses.dataclass(frozen=True)
class Package:
    """One AOTInductor package: a stage at one batch and latent size (the text encoder has no size)."""

    stage: str
    batch: int
    height: int = 0
    width: int = 0

    @property
    def name(self) -> str:
        sized = f"-{self.height}x{self.width}" if self.height else ""
        return f"{self.stage}-b{self.batch}{sized}"

    def sample_inputs(self, dims: ModelDims, modules: StageModules) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        if self.stage == TEXT_ENCODER:
            return (torch.zeros(self.batch, dims.seq_len, dtype=torch.int64, device=modules.device),)

        def noise(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=gen).to(modules.device, modules.dtype)

        latents = noise(self.batch, dims.latent_channels, self.height, self.width)
        latents = latents.contiguous(memory_format=modules.memory_format)
        if self.stage == DENOISER:
            return latents, noise(self.batch, dims.seq_len, dims.hidden)
        return (latents,)

    def module(self, modules: StageModules) -> nn.Module:
        if self.stage == TEXT_ENCODER:
            return modules.text_encoder
        if self.stage == DENOISER:
            return modules.denoiser
        decoder = next(d for d, name in DECODER_CONTRACTS.items() if name == self.stage)
        return modules.decoders[decoder]


def packages(components: Components, config: EngineConfig) -> list[Package]:
    """Every package the server warms: each stage at each bucket, the sized ones at each warmed size."""
    dims = ModelDims.from_components(components)
    buckets = dataclasses.replace(config, torch_compile=TorchCompile.AOT).batch_buckets()
    sizes = config.warm_sizes or ((dims.default_size, dims.default_size),)
    latent = sorted({(h // dims.vae_scale, w // dims.vae_scale) for w, h in sizes})
    decoders = [
        n for d, n in DECODER_CONTRACTS.items() if d is Decoder.FULL or components.vae_tiny is not None
    ]
    out = [Package(TEXT_ENCODER, b) for b in buckets]
    for stage in (DENOISER, *decoders):
        out += [Package(stage, b, h, w) for b in buckets for h, w in latent]
    return out


def load(
    artefacts: Artefacts, components: Components, config: EngineConfig, modules: StageModules
) -> dict[ShapeKey, Callable[..., torch.Tensor]]:
    """Each package of `artefacts` the config warms, given the loaded model's weights, by the shape it runs;
    on CUDA wrapped to capture a CUDA graph on its first call."""
    dims = ModelDims.from_components(components)
    pool = torch.cuda.graph_pool_handle() if modules.device.type == "cuda" else None
    out: dict[ShapeKey, Callable[..., torch.Tensor]] = {}
    for package in packages(components, config):
        if package.name not in artefacts.files:
            raise BackendUnavailableError(
                f"{artefacts.folder} holds no {package.name}; run `tiue build-engines` again"
            )
        try:
            compiled = _load_package(artefacts.files[package.name], modules.device)
            _share_weights(compiled, package.module(modules), package.name)
        except BackendUnavailableError:
            raise
        except Exception as exc:  # the loader raises RuntimeError for a damaged or foreign package
            raise BackendUnavailableError(f"{package.name} did not load: {exc}") from exc
        shape = tuple(package.sample_inputs(dims, modules)[0].shape)
        fn: Callable[..., torch.Tensor] = compiled
        if pool is not None:
            fn = GraphedCallable(compiled, package.name, pool)
        out[(package.stage, shape)] = fn
    return out


def _load_package(path: Path, device: torch.device) -> Any:
    load_package: Callable[..., Any] = torch._inductor.aoti_load_package
    options: dict[str, Any] = {}
    params = inspect.signature(load_package).parameters
    if device.type == "cuda":
        if "run_single_threaded" in params:  # torch >= 2.7: no locking around a run, as CUDA graphs need
            options["run_single_threaded"] = True
        if "device_index" in params and device.index is not None:
            options["device_index"] = device.index
    return load_package(str(path), **options)


def _share_weights(compiled: Any, module: nn.Module, name: str) -> None:
    """The package runs on the module's own parameters and buffers (no copy per bucket)."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    fqns = list(compiled.get_constant_fqns())
    absent = [f for f in fqns if f not in tensors]
    if absent:
        raise BackendUnavailableError(f"package {name} wants constants the model does not have: {absent[:5]}")
    constants = {f: tensors[f] for f in fqns}
    try:
        compiled.load_constants(constants, check_full_update=True, user_managed=True)
    except TypeError:  # torch < 2.7 has no user_managed: the package keeps a copy
        compiled.load_constants(constants, check_full_update=True)
