"""Eager, compiled (engine.compiling: static shapes per warmed bucket) or built ahead of time
(engine.export.torch_aot: AOTInductor packages, CUDA graphs on a GPU) PyTorch on CPU or CUDA."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from engine import compiling
from engine.backends.torch_modules import stage_modules
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError
from engine.export.cache import Entry
from engine.export.contracts import DECODER_CONTRACTS, DENOISER, TEXT_ENCODER
from engine.loading import Components
from engine.types import Decoder, TorchCompile

log = logging.getLogger(__name__)


class TorchBackend:
    name = "torch"

    @staticmethod
    def check_runnable(config: EngineConfig) -> None:
        """Torch runs wherever it imports; a bad device fails when the modules move to it."""
        if config.compile_mode is TorchCompile.REDUCE_OVERHEAD and torch.device(config.device).type != "cuda":
            raise BackendUnavailableError(
                f"torch_compile reduce-overhead records CUDA graphs and needs device cuda (got {config.device}); "
                "set TIUE_TORCH_COMPILE=default (or off) on the CPU"
            )

    def __init__(
        self,
        components: Components,
        config: EngineConfig,
        artefacts: Entry | None = None,  # AOTInductor packages, when config.torch_compile is aot
        denoiser: nn.Module | None = None,  # instead of the TiUE one-pass (benchmarks: a looped student)
    ):
        modules = stage_modules(components, config, denoiser)
        self.device, self.dtype, self.memory_format = modules.device, modules.dtype, modules.memory_format
        self.text_encoder, self.denoiser, self.decoders = (
            modules.text_encoder,
            modules.denoiser,
            modules.decoders,
        )
        # Built packages by (stage, input shape); a shape without one runs the module eagerly.
        self.packages: dict[tuple[str, tuple[int, ...]], Callable[..., torch.Tensor]] = {}
        mode = config.compile_mode
        if mode is TorchCompile.AOT:
            if artefacts is None:
                raise BackendUnavailableError("torch_compile aot needs built packages (tiue build-engines)")
            from engine.export import torch_aot

            self.packages = torch_aot.load(artefacts, components, config, modules)
            log.info("loaded %d AOTInductor packages from %s", len(self.packages), artefacts.path)
        elif mode is not TorchCompile.OFF:
            log.info(
                "torch.compile %s: the text encoder, denoiser and decoders, static shapes per bucket "
                "(batches %s), cache %s",
                mode.value,
                ",".join(map(str, config.batch_buckets())),
                compiling.cache_dir(config),
            )
            compiling.prepare(config)
            self.text_encoder = compiling.compile_module(self.text_encoder, mode)
            self.denoiser = compiling.compile_module(self.denoiser, mode)
            self.decoders = {d: compiling.compile_module(m, mode) for d, m in self.decoders.items()}

    def unsupported(self, batch: int, latent_height: int, latent_width: int) -> str | None:
        return None

    def _run(self, stage: str, module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        package = self.packages.get((stage, tuple(inputs[0].shape)))
        return package(*inputs) if package is not None else module(*inputs)

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(TEXT_ENCODER, self.text_encoder, input_ids.to(self.device))

    @torch.inference_mode()
    def denoise(self, z_t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        z_t = z_t.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        return self._run(DENOISER, self.denoiser, z_t, states.to(self.dtype))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, decoder: Decoder = Decoder.FULL) -> torch.Tensor:
        latents = latents.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        return self._run(DECODER_CONTRACTS[decoder], self.decoders[decoder], latents)
