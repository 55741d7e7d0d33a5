"""The torch backend's built artefacts: AOTInductor packages, one per stage, batch bucket and size.

`tiue build-engines --backend torch` exports each stage as the torch backend splits it (text encoder,
TiUE denoiser, each decoder; engine.backends.torch_modules) at every warmed batch bucket and size with
static shapes, and compiles it ahead of time (`torch._inductor.aoti_compile_and_package`). A server
started with the same settings finds them under their key (model content hash, steps, precision,
torch/diffusers/transformers versions, device model) and loads them in seconds instead of compiling
for minutes; on a GPU each is then captured in a CUDA graph on its first call (warm-up). The packages
hold code, not weights: the loaded model's own tensors are handed to them, so every bucket shares
one copy. Packages for another GPU, torch or model are refused, the reason named in one log line,
and the server compiles as without them (engine.config.EngineConfig.compile_mode).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.backends.cuda_graphs import GraphedCallable
from engine.backends.torch_modules import StageModules, stage_modules
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError
from engine.export.cache import ArtefactKey, ArtefactStore, Entry, components_hash, engine_store
from engine.export.contracts import DECODER_CONTRACTS, DENOISER, TEXT_ENCODER
from engine.export.profiles import ModelDims, Profile, Range
from engine.loading import Components
from engine.types import BackendName, Decoder, TorchCompile

log = logging.getLogger(__name__)

KIND = "torch-aoti"
EXPORTER = "aoti-static-v1"  # static shapes per bucket, weights outside the package
_INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False}

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


def device_target(device: torch.device) -> str:
    """What compiled code is specific to: the GPU model and compute capability, or the CPU's vector ISA."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return f"{device.type} {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


def _libraries() -> tuple[tuple[str, str], ...]:
    import diffusers
    import transformers

    return tuple(
        sorted(
            {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            }.items()
        )
    )


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


def aot_key(components: Components, config: EngineConfig, wanted: list[Package]) -> ArtefactKey:
    profiles = tuple(
        Profile(
            Range(p.batch, p.batch, p.batch),
            Range(p.height, p.height, p.height),
            Range(p.width, p.width, p.width),
        )
        for p in wanted
        if p.stage == DENOISER
    )
    return ArtefactKey(
        kind=KIND,
        model_hash=components_hash(components),
        steps=components.chain.steps,
        precision=config.precision.value,
        profiles=profiles,
        exporter=EXPORTER,
        libraries=_libraries(),
        compute_capability=device_target(torch.device(config.device)),
    )


def find(components: Components, config: EngineConfig) -> tuple[Entry | None, list[Package], str]:
    """The entry holding every package `config` warms, and else why none does (in words)."""
    wanted = packages(components, config)
    store = engine_store(config.engine_dir)
    if not store.entries(KIND):  # no model hash to compute (seconds for a multi-GB checkpoint)
        return None, wanted, f"there are none in {store.root}"

    def covers(entry: Entry) -> str | None:
        absent = [p.name for p in wanted if p.name not in entry.files]
        return f"holds no {', '.join(absent)}" if absent else None

    entry, rejected = store.find(aot_key(components, config, wanted), covers)
    return entry, wanted, "; ".join(rejected) or f"there are none in {store.root}"


def wants_packages(config: EngineConfig) -> bool:
    """aot, and auto on CUDA, run built packages when there are usable ones."""
    return BackendName(config.backend) is BackendName.TORCH and (
        config.torch_compile is TorchCompile.AOT
        or (config.torch_compile is TorchCompile.AUTO and config.on_cuda)
    )


def resolve(components: Components, config: EngineConfig) -> EngineConfig:
    """The config this process runs: torch_compile aot when usable packages are found for it, else what
    it compiles instead (auto's choice for the device), with the reason in one log line. Never fails."""
    if not wants_packages(config):
        return config
    try:
        entry, _, why = find(components, config)
    except (OSError, RuntimeError, ValueError) as exc:  # an unreadable cache is no reason not to serve
        entry, why = None, f"the lookup failed: {exc}"
    if entry is not None:
        log.info("torch AOTInductor packages found: %s", entry.path)
        return dataclasses.replace(config, torch_compile=TorchCompile.AOT)
    quiet = config.torch_compile is TorchCompile.AUTO and not engine_store(config.engine_dir).entries(KIND)
    return fall_back(config, why, logging.INFO if quiet else logging.WARNING)  # auto without any: ordinary


def fall_back(config: EngineConfig, why: str, level: int = logging.WARNING) -> EngineConfig:
    """Without packages: reduce-overhead on CUDA, off on the CPU (auto's choice), said in one log line."""
    fallback = TorchCompile.REDUCE_OVERHEAD if config.on_cuda else TorchCompile.OFF
    log.log(level, "no usable torch AOTInductor packages (%s); torch_compile %s instead", why, fallback.value)
    return dataclasses.replace(config, torch_compile=fallback)


# -- building ----------------------------------------------------------------------------------------


def build(components: Components, config: EngineConfig) -> Entry:
    """The packages `config` warms, found or built now into its engine folder."""
    entry, wanted, why = find(components, config)
    if entry is not None:
        log.info("using cached %s artefacts %s", KIND, entry.path)
        return entry
    log.info("building %d AOTInductor packages (%s)", len(wanted), why)
    modules = stage_modules(components, config)
    dims = ModelDims.from_components(components)
    key = aot_key(components, config, wanted)
    store: ArtefactStore = engine_store(config.engine_dir)

    def write(folder: Path) -> Iterator[tuple[str, Path]]:
        for package in wanted:
            yield package.name, _compile(package, modules, dims, folder / f"{package.name}.pt2")

    return store.create(key, write, {"dims": dataclasses.asdict(dims), "packages": len(wanted)})


def _compile(package: Package, modules: StageModules, dims: ModelDims, path: Path) -> Path:
    started = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(
                package.module(modules), package.sample_inputs(dims, modules), strict=False
            )
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs=dict(_INDUCTOR_CONFIGS)
            )
    except Exception as exc:  # export and inductor raise many kinds: name the package, stop the build
        raise BackendUnavailableError(
            f"AOTInductor could not build {package.name}: {type(exc).__name__}: {exc}"
        ) from exc
    log.info("compiled %s in %.1fs", package.name, time.perf_counter() - started)
    return path


# -- loading -----------------------------------------------------------------------------------------


def load(
    entry: Entry, components: Components, config: EngineConfig, modules: StageModules
) -> dict[ShapeKey, Callable[..., torch.Tensor]]:
    """Each package of `entry` the config warms, given the loaded model's weights, by the shape it runs;
    on CUDA wrapped to capture a CUDA graph on its first call."""
    dims = ModelDims.from_components(components)
    pool = torch.cuda.graph_pool_handle() if modules.device.type == "cuda" else None
    out: dict[ShapeKey, Callable[..., torch.Tensor]] = {}
    for package in packages(components, config):
        if package.name not in entry.files:
            raise BackendUnavailableError(
                f"{entry.path} holds no {package.name}; run `tiue build-engines` again"
            )
        try:
            compiled = _load_package(entry.file(package.name), modules.device)
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
